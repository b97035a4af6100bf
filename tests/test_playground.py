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


def open_page(p, server, width: int, height: int = 900):
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))  # script errors (CSP, bugs)
    page.goto(server.url + "/playground")
    return browser, page, errors


@pytest.fixture()
def browser_page(server):
    with playwright.sync_playwright() as p:
        browser, page, errors = open_page(p, server, 1200)
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


def assert_fits(page, width: int) -> None:
    """Nothing wider than the screen: every visible control's right edge within the viewport."""
    for selector in ("header", "form", ".result figure", "#prompt", "#seed", "#generate", "#api-key", "#size"):
        box = page.locator(selector).first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, (selector, box, width)


@pytest.mark.parametrize("width", [1280, 390, 360])
def test_layout_progress_cancel_download_and_copy_at_each_width(server, width, tmp_path_factory):
    import subprocess
    import sys

    from conftest import image_difference

    artifacts = tmp_path_factory.mktemp(f"playground-{width}")
    with playwright.sync_playwright() as p:
        browser, page, console_errors = open_page(p, server, width, 800)
        try:
            # first visit: the hint in the empty result area; on the tiny model, small defaults
            page.wait_for_selector("#tiny-hint:not([hidden])")
            assert page.locator("#empty-hint").is_visible() and page.input_value("#width") == "256"
            assert_fits(page, width)
            page.screenshot(path=str(artifacts / "first-visit.png"), full_page=True)

            # a long job: step progress shows, Cancel stops it
            page.fill("#prompt", "a lighthouse at dusk")
            page.fill("#steps", "100")
            page.click("#generate")
            page.locator("#progress-text", has_text="step").wait_for(timeout=60_000)
            page.screenshot(path=str(artifacts / "progress.png"), full_page=True)
            page.click("#cancel")
            page.locator("#error", has_text="cancelled").wait_for(timeout=60_000)
            assert page.locator("#progress-box").is_hidden() and page.locator("#result").is_hidden()

            # a 19-digit seed (past 2^53) travels exactly
            seed = "1234567890123456789"
            fill_small(page, seed=seed)
            page.click("#generate")
            page.wait_for_selector("#result-actions:not([hidden])", timeout=60_000)
            assert f"seed {seed}" in page.inner_text("#result-info")
            assert_fits(page, width)
            page.screenshot(path=str(artifacts / "result.png"), full_page=True)
            with page.expect_download() as download:
                page.click("#download")
            shown = artifacts / download.value.suggested_filename
            download.value.save_as(shown)
            assert shown.name == f"ryla-flux-dev-{seed}.png"

            # "copy as curl" and "copy as Python" give the same image when run; the ryla-client
            # line parses with the real CLI and names the seed
            page.click("#copy-curl")
            curl = page.input_value("#snippet")
            assert f'"seed":{seed}' in curl
            subprocess.run(["bash", "-c", curl], cwd=artifacts, check=True, capture_output=True, timeout=120)
            assert image_difference(shown.read_bytes(), (artifacts / "ryla.png").read_bytes()) <= 2
            (artifacts / "ryla.png").unlink()
            page.click("#copy-python")
            python = subprocess.run([sys.executable, "-c", page.input_value("#snippet")], cwd=artifacts,
                                    capture_output=True, text=True, timeout=120)
            assert python.returncode == 0 and f"seed {seed}" in python.stdout, python.stderr
            assert image_difference(shown.read_bytes(), (artifacts / "ryla.png").read_bytes()) <= 2
            page.click("#copy-client")
            import shlex

            from ryla.cli.client import build_parser

            words = shlex.split(page.input_value("#snippet").replace("\\\n", " "))
            assert words[0] == "ryla-client"
            args = build_parser().parse_args(words[1:])
            assert args.command == "flux-dev" and args.seed == int(seed) and args.url == server.url
            assert console_errors == []
            print(f"screenshots: {artifacts}")
        finally:
            browser.close()


def test_api_docs_render_in_a_browser_without_internet(server, strict_server):
    """Swagger UI and ReDoc render from the server's own files (the browser has no other
    network); with an API key set, Swagger UI offers Authorize for it."""
    with playwright.sync_playwright() as p:
        browser, page, console_errors = open_page(p, server, 1280)
        try:
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
                       or route.request.url.startswith(strict_server.url) else route.abort())
            page.goto(server.url + "/docs")
            page.locator(".swagger-ui .info .title", has_text="ryla").wait_for(timeout=30_000)
            assert page.locator(".opblock-summary-path", has_text="/flux-dev").count() >= 1
            page.goto(strict_server.url + "/docs")
            page.locator(".swagger-ui button.authorize").wait_for(timeout=30_000)
            page.goto(server.url + "/redoc")
            page.locator("h1", has_text="ryla").wait_for(timeout=30_000)
            assert console_errors == []
        finally:
            browser.close()
