"""ComfyUI's own editor (comfyui-frontend-package, the `ui` extra) served by `ryla serve`: the
endpoints it calls, in ComfyUI's shapes; its sign-in when the server has a key; and, in a
headless Chromium, the editor loading Comfy-Org's FLUX.1-dev template, queueing it and showing
the image, with no failed request to ryla."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import Server

frontend = pytest.importorskip("comfyui_frontend_package")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_editor_is_served_at_the_root_and_the_playground_moves(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>" in page.text.lower() or "comfy" in page.text.lower()
    assert httpx.get(server.url + "/playground").status_code == 200
    asset = httpx.get(server.url + "/materialdesignicons.min.css")
    assert asset.status_code == 200
    assert httpx.get(server.url + "/../pyproject.toml").status_code == 404
    assert httpx.get(server.url + "/assets/%2e%2e/%2e%2e/__init__.py").status_code == 404


def test_user_settings_and_files_in_comfyuis_shapes(server):
    url = server.url + "/api"
    assert httpx.get(url + "/users").json() == {"storage": "server", "migrated": True}
    assert httpx.post(url + "/settings", json={"Comfy.Locale": "en", "Comfy.Theme": "dark"}).status_code == 200
    assert httpx.post(url + "/settings/Comfy.Theme", json="light").status_code == 200
    assert httpx.get(url + "/settings").json()["Comfy.Theme"] == "light"
    assert httpx.get(url + "/settings/Comfy.Locale").json() == "en"
    workflow = {"nodes": [], "links": []}
    r = httpx.post(url + "/userdata/workflows%2Fmine.json?overwrite=true&full_info=true", content=json.dumps(workflow))
    assert r.status_code == 200 and r.json()["path"] == "workflows/mine.json"
    assert httpx.post(url + "/userdata/workflows%2Fmine.json?overwrite=false", content="{}").status_code == 409
    listed = httpx.get(url + "/userdata", params={"dir": "workflows", "recurse": "true", "full_info": "true"}).json()
    assert [item["path"] for item in listed] == ["mine.json"]
    assert httpx.get(url + "/userdata/workflows%2Fmine.json").json() == workflow
    assert httpx.post(url + "/userdata/workflows%2Fmine.json/move/workflows%2Fyours.json").status_code == 200
    assert httpx.get(url + "/userdata", params={"dir": "workflows"}).json() == ["yours.json"]
    assert httpx.delete(url + "/userdata/workflows%2Fyours.json").status_code == 204
    for escape in ("..%2F..%2Fsecret", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2F..%2Fx"):
        assert httpx.post(url + f"/userdata/{escape}", content="x").status_code in (400, 403), escape


def test_models_templates_and_jobs_for_the_editor(server):
    url = server.url
    folders = {entry["name"] for entry in httpx.get(url + "/api/experiment/models").json()}
    assert {"checkpoints", "diffusion_models", "loras", "vae"} <= folders
    names = [entry["name"] for entry in httpx.get(url + "/api/experiment/models/checkpoints").json()]
    assert names == ["flux1-dev-fp8.safetensors"]
    index = httpx.get(url + "/templates/index.json")
    assert index.status_code == 200 and isinstance(index.json(), list)
    flux = httpx.get(url + "/templates/flux_dev_full_text_to_image.json").json()
    assert "nodes" in flux
    thumbnail = httpx.get(url + "/templates/flux_dev_full_text_to_image-1.webp")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
    assert httpx.get(url + "/templates/nope.json").status_code == 404
    # a job, then ComfyUI's jobs API lists it
    graph = json.loads((Path(__file__).parents[1] / "src/ryla/workflows/flux_dev.json").read_text())
    graph["5"]["inputs"].update(width=64, height=64)
    graph["7"]["inputs"]["steps"] = 2
    prompt_id = httpx.post(url + "/api/prompt", json={"prompt": graph}).json()["prompt_id"]
    for _ in range(240):
        job = httpx.get(url + f"/api/jobs/{prompt_id}").json()
        if job["status"] in ("completed", "failed"):
            break
        time.sleep(0.5)
    assert job["status"] == "completed" and job["outputs_count"] == 1
    assert job["preview_output"]["filename"].startswith("ryla_") and job["preview_output"]["nodeId"] == "9"
    listed = httpx.get(url + "/api/jobs", params={"status": "completed,failed", "limit": 5}).json()
    assert prompt_id in [entry["id"] for entry in listed["jobs"]] and listed["pagination"]["limit"] == 5
    assert httpx.get(url + "/api/jobs", params={"status": "bogus"}).status_code == 400


@pytest.fixture(scope="module")
def keyed_server(server_env, tmp_path_factory):
    env = {**server_env, "RYLA_API_KEY": "editor-key-1"}
    srv = Server(env, log_path=tmp_path_factory.mktemp("logs") / "keyed.log")
    yield srv
    srv.stop()


def test_with_a_key_the_editor_signs_in_with_a_session_cookie(keyed_server):
    url = keyed_server.url
    with httpx.Client(base_url=url, follow_redirects=False) as client:
        r = client.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert client.get("/login").status_code == 200
        assert client.get("/api/users").status_code == 401
        assert client.post("/login", data={"key": "wrong"}).status_code == 401
        r = client.post("/login", data={"key": "editor-key-1"})
        assert r.status_code == 303 and "ryla_session" in r.headers["set-cookie"]
        assert "editor-key-1" not in r.headers["set-cookie"] and "httponly" in r.headers["set-cookie"].lower()
        assert client.get("/").status_code == 200 and client.get("/api/users").status_code == 200
        assert client.get("/materialdesignicons.min.css").status_code == 200
        # the cookie does not act for a page of another origin
        r = client.post("/api/settings", json={"a": 1}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 401
        assert client.post("/api/settings", json={"a": 1}, headers={"Origin": url}).status_code == 200
    assert httpx.get(url + "/materialdesignicons.min.css").status_code == 401  # no session, no key


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_the_editor_runs_the_flux1_dev_template_in_a_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    templates = pytest.importorskip("comfyui_workflow_templates_json")
    template = json.loads((Path(templates.__file__).parent / "templates" / "flux_dev_full_text_to_image.json")
                          .read_text())
    for graph in [template] + template["definitions"]["subgraphs"]:
        for node in graph["nodes"]:  # as one would in the editor: 64 pixels, 2 steps (a CPU here)
            if node["type"] == "EmptySD3LatentImage":
                node["widgets_values"][:2] = [64, 64]
            if node["type"] == "KSampler":
                node["widgets_values"][2] = 2
    failed, shown, errors = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})

        def on_response(response):
            if response.url.startswith(server.url) and response.status >= 400:
                failed.append((response.status, response.request.method, response.url))
            if "/view?" in response.url and response.status == 200:
                shown.append(response.url)

        page.on("response", on_response)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
        page.wait_for_selector("canvas", timeout=60_000)
        node_library = page.evaluate("async () => Object.keys(await window.app.api.getNodeDefs()).length")
        page.keyboard.press("Escape")  # the templates dialog a first start opens
        page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", template)
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        for _ in range(300):
            if shown:
                break
            page.wait_for_timeout(500)
        page.wait_for_timeout(1500)
        page.mouse.click(300, 300)
        page.keyboard.press(".")  # fit the graph in view
        page.wait_for_timeout(1000)
        page.screenshot(path=str(tmp_path / "editor.png"))
        browser.close()
    assert node_library >= 60
    assert shown and "ComfyUI_" in shown[0], "the editor never showed the generated image"
    assert failed == [], failed
    assert errors == [], errors
