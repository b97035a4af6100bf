"""The browser playground at `/`, driven in headless Chromium against a live server."""

from __future__ import annotations

import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")


def test_page_is_served_with_types_and_a_restrictive_csp(server):
    page = httpx.get(server.url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "http" not in csp
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert httpx.get(server.url + "/static/../app.py").status_code == 404
    assert "https://" not in page.text and "//cdn" not in page.text


@pytest.fixture()
def browser_page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))  # script errors (CSP, bugs)
        page.goto(server.url + "/playground")
        yield page, errors
        browser.close()


def fill_small(page, width="64", seed="7"):
    page.select_option("#size", "custom")
    page.fill("#prompt", "a red fox in the snow")
    page.fill("#width", width)
    page.fill("#height", "64")
    page.fill("#steps", "2")
    page.fill("#seed", seed)


def test_generate_bad_input_and_identity_in_a_browser(browser_page, tmp_path_factory):
    page, console_errors = browser_page
    fill_small(page)
    page.click("#generate")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    page.wait_for_selector("#generate:not([disabled])")  # the page's CSP forbids evaluated JS
    assert "seed 7" in page.inner_text("#result-info")
    assert page.locator("#history img").count() == 1
    shot = tmp_path_factory.mktemp("artifacts") / "playground-after-generation.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    fill_small(page, width="1000")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert page.inner_text("#error").startswith("width")

    page.click("[data-mode=flux-instantid]")
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(data.astronaut())).save(buffer, "PNG")
    page.set_input_files("#reference", files=[{"name": "face.png", "mimeType": "image/png",
                                               "buffer": buffer.getvalue()}])
    page.wait_for_selector("#reference-preview:not([hidden])")
    fill_small(page, seed="8")
    page.click("#generate")
    page.locator("#result-info", has_text="flux-instantid").wait_for(timeout=60_000)
    assert "seed 8" in page.inner_text("#result-info") and page.locator("#history img").count() == 2
    page.click("[data-mode=flux-lora]")
    page.wait_for_selector("#lora-id option", state="attached")
    assert console_errors == []
    page.click("[data-mode=flux-dev]")
    assert page.locator("#lora-panel").is_hidden() and page.locator("#identity-panel").is_hidden()
