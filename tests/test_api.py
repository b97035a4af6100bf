"""End-to-end HTTP tests against a real `ryla serve` subprocess on the tiny model."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from ryla.workflows import FLUX_DEV
from conftest import image_difference

SMALL = {"prompt": "a red fox in the snow", "width": 128, "height": 128, "steps": 3, "seed": 11}
SLOW = {"prompt": "slow", "width": 1024, "height": 1024, "steps": 100, "seed": 1}
KEY = {"Authorization": "Bearer s3cret-key"}


def test_flux_dev_returns_jpeg_bytes_with_seed_and_request_id(server):
    r = httpx.post(server.url + "/flux-dev", json=SMALL, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-seed"] == "11" and r.headers["x-request-id"]
    assert float(r.headers["x-generation-time"]) > 0
    assert Image.open(io.BytesIO(r.content)).size == (128, 128)
    again = httpx.post(server.url + "/flux-dev", json=SMALL, timeout=120)
    assert image_difference(again.content, r.content) <= 2  # same seed, same image (conftest)


def test_random_seed_is_reported_and_reproduces(server):
    body = {k: v for k, v in SMALL.items() if k != "seed"}
    r = httpx.post(server.url + "/flux-dev", json=body, timeout=120)
    seed = int(r.headers["x-seed"])
    replay = httpx.post(server.url + "/flux-dev", json={**body, "seed": seed}, timeout=120)
    assert image_difference(replay.content, r.content) <= 2


def test_json_response_and_several_images(server):
    r = httpx.post(server.url + "/flux-dev", json={**SMALL, "num_images": 2, "output_format": "png"}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert len(body["images"]) == 2 and body["request_id"] == r.headers["x-request-id"]
    assert {i["seed"] for i in body["images"]} == {11} and body["images"][0]["format"] == "png"
    assert set(body["timings"]) >= {"queue_s", "generation_s", "total_s"}
    first = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["data"])))
    assert first.format == "PNG" and first.size == (128, 128)
    single = httpx.post(server.url + "/flux-dev", json=SMALL, headers={"Accept": "application/json"}, timeout=120)
    assert len(single.json()["images"]) == 1


def test_workflow_template_equals_flux_dev(server):
    direct = httpx.post(server.url + "/flux-dev", json={**SMALL, "output_format": "png"}, timeout=120)
    graph = FLUX_DEV.fill(prompt=SMALL["prompt"], width=128, height=128, steps=3, seed=11)
    bare = httpx.post(server.url + "/workflow", json=graph, timeout=120)
    wrapped = httpx.post(server.url + "/workflow", json={"prompt": graph, "client_id": "x"}, timeout=120)
    assert bare.status_code == wrapped.status_code == 200, bare.text
    assert bare.headers["content-type"] == "image/png"
    assert image_difference(bare.content, direct.content) <= 2
    assert image_difference(wrapped.content, bare.content) <= 2


def test_invalid_workflow_gets_comfyui_error_shape(server):
    graph = FLUX_DEV.fill(prompt="x", width=128, height=128, steps=3, seed=1)
    graph["7"]["inputs"]["steps"] = 0
    r = httpx.post(server.url + "/workflow", json=graph, timeout=30)
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["7"]["errors"][0]["type"] == "value_smaller_than_min"


@pytest.mark.parametrize("body,field", [
    ({**SMALL, "width": 1000}, "width"),
    ({**SMALL, "steps": 0}, "steps"),
    ({**SMALL, "prompt": ""}, "prompt"),
    ({**SMALL, "num_images": 9}, "num_images"),
    ({**SMALL, "output_format": "gif"}, "output_format"),
    ({**SMALL, "setps": 3}, "setps"),
    ({k: v for k, v in SMALL.items() if k != "prompt"}, "prompt"),
    ({**SMALL, "seed": -1}, "seed"),
])
def test_invalid_fields_get_422_naming_the_field(server, body, field):
    r = httpx.post(server.url + "/flux-dev", json=body, timeout=30)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["type"] == "invalid_request" and error["message"].startswith(field)
    assert error["details"]["errors"][0]["field"] == field


def test_malformed_json_unknown_route_and_method(server):
    r = httpx.post(server.url + "/flux-dev", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.get(server.url + "/flux-dev")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"


def test_five_concurrent_requests_all_succeed(server):
    def call(i):
        return httpx.post(server.url + "/flux-dev", json={**SMALL, "seed": i}, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(call, range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert len({r.content for r in responses}) == 5


def test_health_models_object_info_metrics(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model_set"] == "tiny"
    assert any(m.startswith("transformer:") for m in health["loaded_models"])
    models = httpx.get(server.url + "/store").json()
    assert models["folders"]["checkpoints"] == ["flux1-dev-fp8.safetensors"]
    info = httpx.get(server.url + "/object_info").json()
    assert {"KSampler", "CheckpointLoaderSimple", "SaveImage", "SamplerCustomAdvanced"} <= set(info)
    assert httpx.get(server.url + "/object_info/KSampler").json()["KSampler"]["output"] == ["LATENT"]
    assert httpx.get(server.url + "/object_info/Nope").json() == {}  # as ComfyUI answers
    assert httpx.post(server.url + "/flux-dev", json=SMALL, timeout=300).status_code == 200  # counted below
    metrics = httpx.get(server.url + "/metrics").text
    assert 'ryla_requests_total{method="POST",route="/flux-dev",status="200"}' in metrics
    assert "ryla_queue_depth" in metrics and "ryla_generation_seconds_bucket" in metrics
    # The server's start (imports, models) was frozen out of garbage collections (ryla.startup)
    frozen = re.search(r"^ryla_gc_frozen_objects (\S+)$", metrics, re.M)
    assert frozen and float(frozen.group(1)) > 100_000, frozen
    assert 'python_gc_collections_total{generation="2"}' in metrics
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/flux-dev" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_a_client_that_leaves_does_not_keep_its_work_alive(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/flux-dev", json=SLOW, timeout=1.0)
    # A full run takes several seconds; the cancelled one frees the GPU within a step or two.
    deadline = time.time() + 4
    while httpx.get(server.url + "/health").json()["queue_depth"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["queue_depth"] == 0
    assert "cancelled" in server.log()


def test_auth_required_except_health(strict_server):
    url = strict_server.url
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.post(url + "/flux-dev", json=SMALL)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert httpx.get(url + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/metrics", headers=KEY).status_code == 200
    assert httpx.post(url + "/flux-dev", json=SMALL, headers=KEY, timeout=60).status_code == 200


def test_oversized_body_gets_413(strict_server):
    r = httpx.post(strict_server.url + "/flux-dev", headers=KEY,
                   json={**SMALL, "negative_prompt": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b"x" * 1024

    r = httpx.post(strict_server.url + "/workflow", headers={**KEY, "content-type": "application/json"},
                   content=chunks())
    assert r.status_code == 413


def test_time_limit_gives_504_and_frees_the_gpu(strict_server):
    start = time.time()
    r = httpx.post(strict_server.url + "/flux-dev", json=SLOW, headers=KEY, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert time.time() - start < 6
    time.sleep(0.5)
    assert httpx.get(strict_server.url + "/health").json()["queue_depth"] == 0


def test_queue_full_gets_429_with_retry_after(strict_server):
    url = strict_server.url
    body = {**SLOW, "steps": 20}  # ~1.5 s: under the 2 s limit, long enough to queue behind

    def call(_):
        return httpx.post(url + "/flux-dev", json=body, headers=KEY, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        running = pool.submit(call, 0)
        deadline = time.time() + 5
        while httpx.get(url + "/health").json()["queue_depth"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        others = list(pool.map(call, range(4)))
        statuses = sorted(r.status_code for r in others)
        assert running.result().status_code in (200, 504)
    assert statuses.count(429) >= 2
    rejected = next(r for r in others if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1 and rejected.json()["error"]["type"] == "queue_full"


def client(server, *args, env=None):
    return subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", server.url, *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_ryla_client_flux_dev_writes_the_image(server, tmp_path):
    out = tmp_path / "out.jpg"
    r = client(server, "flux-dev", "--prompt", "a red fox", "--width", "128", "--height", "128", "--steps", "2",
               "--seed", "3", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "seed 3" in r.stdout and Image.open(out).size == (128, 128) and Image.open(out).format == "JPEG"
    png_out = tmp_path / "out.png"
    r = client(server, "flux-dev", "--prompt", "a red fox", "--width", "64", "--height", "64", "--steps", "2",
               "--output", str(png_out))
    assert r.returncode == 0 and Image.open(png_out).format == "PNG"  # the file name picks the format
    r = client(server, "flux-dev", "--prompt", "a red fox", "--width", "1000", "--output", str(tmp_path / "x.jpg"))
    assert r.returncode == 1 and "width" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.jpg").exists()


def test_ryla_client_workflow_and_errors(server, tmp_path):
    import json

    graph = FLUX_DEV.fill(prompt="x", width=128, height=128, steps=2, seed=1, batch_size=2)
    (tmp_path / "wf.json").write_text(json.dumps(graph))
    r = client(server, "workflow", str(tmp_path / "wf.json"), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    # named by the graph's SaveImage prefix, numbered as ComfyUI numbers them
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ryla_flux_dev_00001.png",
                                                                      "ryla_flux_dev_00002.png"]
    graph["7"]["inputs"]["sampler_name"] = "lms"
    (tmp_path / "bad.json").write_text(json.dumps(graph))
    r = client(server, "workflow", str(tmp_path / "bad.json"))
    assert r.returncode == 1 and "node 7 (KSampler)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", "http://127.0.0.1:9", "health"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach the server" in r.stderr


def test_api_docs_pages_work_offline_and_with_a_key(server, strict_server):
    """/docs and /redoc load their scripts from this server (no CDN), and stay public with an
    API key set; the OpenAPI document then names the key as a Bearer scheme, so Swagger UI's
    Authorize button asks for it."""
    for srv in (server, strict_server):
        for page, asset in (("/docs", "/docs-assets/swagger-ui-bundle.js"), ("/redoc", "/docs-assets/redoc.standalone.js")):
            html = httpx.get(srv.url + page)
            assert html.status_code == 200 and asset in html.text, (page, html.status_code)
            assert "cdn." not in html.text and "fonts.googleapis" not in html.text
            script = httpx.get(srv.url + asset)
            assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
            assert len(script.content) > 500_000
    assert httpx.get(server.url + "/docs-assets/../app.py").status_code == 404
    keyed = httpx.get(strict_server.url + "/openapi.json").json()
    assert keyed["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": keyed["components"]["securitySchemes"]["apiKey"]["description"]}
    assert keyed["security"] == [{"apiKey": []}]
    document = httpx.get(server.url + "/openapi.json").json()
    assert "security" not in document
    # every reference resolves inside the document (ReDoc refuses "#/$defs/..." ones)
    import json
    import re

    for reference in set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(document))):
        node = document
        for part in reference.removeprefix("#/").split("/"):
            node = node[part]
    assert httpx.post(strict_server.url + "/flux-dev", json={"prompt": "x"}).status_code == 401


def test_typed_images_carry_their_parameters_and_the_client_never_overwrites(server, tmp_path):
    import subprocess
    import sys

    from ryla import imaging

    body = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2, "seed": 9, "output_format": "webp"}
    response = httpx.post(server.url + "/flux-dev", json=body, timeout=120)
    assert response.status_code == 200
    assert imaging.read_parameters(response.content) == {
        "prompt": "a red fox", "negative_prompt": "", "seed": 9, "width": 64, "height": 64, "steps": 2,
        "guidance": 3.5, "cfg": 1.0, "model": "flux1-dev-fp8.safetensors (tiny random weights)"}
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-m", "ryla.cli.client", "flux-dev", "--prompt", "a fox", "--width",
                                 "64", "--height", "64", "--steps", "2", "--seed", seed, "--url", server.url],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ryla_00001.jpg", "ryla_00002.jpg"]
    assert imaging.read_parameters((tmp_path / "ryla_00002.jpg").read_bytes())["seed"] == 2
    # an asynchronous job's stored PNG (what /view and `ryla-client --async` fetch) carries them too
    import time

    job = httpx.post(server.url + "/flux-dev", json={**body, "seed": 12}, headers={"Prefer": "respond-async"}).json()
    deadline = time.time() + 120
    while (state := httpx.get(server.url + f"/jobs/{job['job_id']}").json())["status"] != "success":
        assert time.time() < deadline and state["status"] in ("pending", "running"), state
        time.sleep(0.2)
    stored = httpx.get(state["result"]["images"][0]["url"]).content
    assert imaging.read_parameters(stored)["seed"] == 12


def test_encoding_and_storing_never_save_the_shared_image_object(tmp_path):
    """Image.save keeps its options on the image object (encoderinfo), and the server saves one
    result image from two threads: the job's PNG in the output folder, the response in the
    request's format. Saving the shared object let one thread write with the other's options
    (seen in 1 of 300 tries: a WebP response at quality 80 without its EXIF). Both now save a
    copy, which leaves the shared object untouched; the race itself is too rare to test."""
    import numpy as np
    from PIL import Image

    from ryla import imaging
    from ryla.api.storage import DataFolders

    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    for fmt in ("webp", "jpeg", "png"):
        assert imaging.read_parameters(imaging.encode(image, fmt, 90, {"seed": 1})) == {"seed": 1}
    folders = DataFolders(tmp_path, 10**9, None)
    folders.save_png(image, "output", "ryla", {"1": {}}, {"parameters": {"seed": 1}})
    assert not hasattr(image, "encoderinfo"), "a save ran on the shared image object"
