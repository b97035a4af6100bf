"""The protocols existing clients speak, against a live `ryla serve` on the tiny model, driven by
the clients themselves: comfy-api-simplified (PyPI), a websocket client written the way ComfyUI's
script_examples/websockets_api_example.py is, the official `openai` package, and
`ryla-client --async`. Then what ComfyUI's queue, history, interrupt, upload and view routes
promise, ryla's async jobs with their event stream and webhooks, and the API key on all of it."""

from __future__ import annotations

import base64
import http.server
import io
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid

import httpx
import pytest
from PIL import Image

from conftest import Server
from ryla.workflows import FLUX_DEV

SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4, "seed": 3}
KEY = "proto-key"


def small_graph(**overrides) -> dict:
    return FLUX_DEV.fill(**{**SMALL, **overrides})


def slow_graph() -> dict:
    # The tiny model takes ~75 ms a step at 1024x1024 on 2 cores: several seconds, long enough
    # to interrupt or queue behind.
    return FLUX_DEV.fill(prompt="slow", width=1024, height=1024, steps=100, seed=1)


@pytest.fixture(scope="module")
def comfy_server(server_env, tmp_path_factory):
    """A server that lets requests name webhooks on loopback (the test's receiver)."""
    srv = Server(server_env, "--allow-private-webhooks", "--max-queue", "4",
                 log_path=tmp_path_factory.mktemp("logs") / "protocols.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(server_env, tmp_path_factory):
    env = {**server_env, "RYLA_API_KEY": KEY}
    srv = Server(env, log_path=tmp_path_factory.mktemp("logs") / "protocols-keyed.log")
    yield srv
    srv.stop()


def post_prompt(url: str, graph: dict, **fields) -> str:
    r = httpx.post(url + "/prompt", json={"prompt": graph, **fields}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
    return body["prompt_id"]


def wait_for_history(url: str, prompt_id: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = httpx.get(f"{url}/history/{prompt_id}").json()
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} never reached the history")


def wait_until_running(url: str, prompt_id: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(item[1] == prompt_id for item in httpx.get(url + "/queue").json()["queue_running"]):
            return
        time.sleep(0.02)
    raise AssertionError(f"{prompt_id} never started")


# ---------------------------------------------------------------------- third-party clients

def test_comfy_api_simplified_queues_the_template_and_saves_its_image(comfy_server, tmp_path):
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    workflow = tmp_path / "flux_dev_api.json"
    workflow.write_text(json.dumps(small_graph()))
    api = ComfyApiWrapper(comfy_server.url)
    wrapper = ComfyWorkflowWrapper(str(workflow))
    wrapper.set_node_param("CLIP Text Encode (Positive Prompt)", "text", "a fox in the snow")
    images = api.queue_and_wait_images(wrapper, "Save Image")
    assert len(images) == 1
    (name, data), = images.items()
    assert name.startswith("ryla_flux_dev_") and name.endswith("_.png")
    saved = Image.open(io.BytesIO(data))
    assert saved.size == (64, 64)
    assert json.loads(saved.text["prompt"])["2"]["inputs"]["text"] == "a fox in the snow"
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}
    assert api.get_system_stats()["devices"][0]["type"] == "cpu"
    assert api.get_embeddings() == []
    assert "KSampler" in api.get_object_info("KSampler")


def test_websocket_client_as_comfyuis_example_gets_progress_and_the_image(comfy_server):
    import websocket  # websocket-client, as ComfyUI's script_examples use

    host = comfy_server.url.removeprefix("http://")
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws://{host}/ws?clientId={client_id}")
    request = urllib.request.Request(f"http://{host}/prompt",
                                     data=json.dumps({"prompt": small_graph(), "client_id": client_id}).encode())
    prompt_id = json.loads(urllib.request.urlopen(request).read())["prompt_id"]
    messages = []
    while True:
        out = ws.recv()
        if isinstance(out, str):
            message = json.loads(out)
            messages.append(message)
            if message["type"] == "executing" and message["data"]["node"] is None \
                    and message["data"]["prompt_id"] == prompt_id:
                break
    ws.close()
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "status" and messages[0]["data"]["sid"] == client_id
    assert kinds.index("execution_start") < kinds.index("progress") < kinds.index("executed") \
        < kinds.index("execution_success")
    steps = [m["data"] for m in messages if m["type"] == "progress"]
    assert [s["value"] for s in steps] == [1, 2, 3, 4] and {s["max"] for s in steps} == {4}
    assert {s["prompt_id"] for s in steps} == {prompt_id} and {s["node"] for s in steps} == {"7"}
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"

    history = json.loads(urllib.request.urlopen(f"http://{host}/history/{prompt_id}").read())[prompt_id]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"]
    assert [m[0] for m in history["status"]["messages"]] == ["execution_start", "execution_cached",
                                                            "execution_success"]
    assert history["prompt"][1] == prompt_id and history["prompt"][3]["client_id"] == client_id
    image = history["outputs"]["9"]["images"][0]
    data = urllib.request.urlopen(f"http://{host}/view?{urllib.parse.urlencode(image)}").read()
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    # Under /api as well, as ComfyUI's newer frontend calls it.
    assert httpx.get(f"{comfy_server.url}/api/history/{prompt_id}").json()[prompt_id]["outputs"] == history["outputs"]


def test_official_openai_client_generates_images(comfy_server):
    import openai

    client = openai.OpenAI(base_url=comfy_server.url + "/v1", api_key="unused-without-a-server-key")
    result = client.images.generate(model="flux-dev", prompt="a red fox", size="64x64", n=2)
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [image.size for image in images] == [(64, 64), (64, 64)] and images[0].format == "PNG"
    by_url = client.images.generate(prompt="a red fox", size="64x64", response_format="url")
    assert Image.open(io.BytesIO(httpx.get(by_url.data[0].url).content)).size == (64, 64)
    with pytest.raises(openai.BadRequestError, match="multiple of 16"):
        client.images.generate(prompt="x", size="65x64")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.images.generate(prompt="x", model="no-such-model")
    assert [m.id for m in client.models.list()][0] == "flux-dev"


def test_openai_errors_have_openais_shape(keyed_server):
    r = httpx.post(keyed_server.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                 "param": None, "code": "invalid_api_key"}
    r = httpx.post(keyed_server.url + "/v1/images/generations", json={"n": 2},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_ryla_client_async_shows_progress_and_writes_the_image(comfy_server, tmp_path):
    out = tmp_path / "fox.jpg"
    result = subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url", comfy_server.url, "flux-dev",
                             "--prompt", "a fox", "--width", "64", "--height", "64", "--steps", "4", "--seed", "9",
                             "--async", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "step 4/4" in result.stderr and "seed 9" in result.stdout
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # converted by /view, as the file name asks


# ---------------------------------------------------------------------- ComfyUI's queue semantics

def test_interrupt_stops_the_running_job_and_history_says_so(comfy_server):
    url = comfy_server.url
    prompt_id = post_prompt(url, slow_graph())
    wait_until_running(url, prompt_id)
    started = time.time()
    assert httpx.post(url + "/interrupt", json={"prompt_id": "someone-else"}).status_code == 200
    time.sleep(0.3)
    assert any(item[1] == prompt_id for item in httpx.get(url + "/queue").json()["queue_running"])
    assert httpx.post(url + "/interrupt").status_code == 200
    entry = wait_for_history(url, prompt_id, timeout=10)
    assert time.time() - started < 5
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert entry["outputs"] == {}


def test_queue_delete_and_clear_remove_pending_jobs(comfy_server):
    url = comfy_server.url
    running = post_prompt(url, slow_graph())
    wait_until_running(url, running)
    first, second, third = (post_prompt(url, small_graph(seed=s)) for s in (1, 2, 3))
    pending = [item[1] for item in httpx.get(url + "/queue").json()["queue_pending"]]
    assert pending == [first, second, third]
    assert httpx.get(url + "/prompt").json() == {"exec_info": {"queue_remaining": 4}}
    httpx.post(url + "/queue", json={"delete": [second]})
    assert [item[1] for item in httpx.get(url + "/queue").json()["queue_pending"]] == [first, third]
    httpx.post(url + "/queue", json={"clear": True})
    assert httpx.get(url + "/queue").json()["queue_pending"] == []
    httpx.post(url + "/interrupt", json={"prompt_id": running})
    wait_for_history(url, running)
    for gone in (first, second, third):
        assert httpx.get(f"{url}/history/{gone}").json() == {}


def test_front_puts_a_prompt_ahead_of_the_queue(comfy_server):
    url = comfy_server.url
    running = post_prompt(url, slow_graph())
    wait_until_running(url, running)
    back = post_prompt(url, small_graph(seed=4))
    front = post_prompt(url, small_graph(seed=5), front=True)
    assert [item[1] for item in httpx.get(url + "/queue").json()["queue_pending"]] == [front, back]
    httpx.post(url + "/interrupt")
    for prompt_id in (front, back):
        assert wait_for_history(url, prompt_id)["status"]["status_str"] == "success"


def test_history_max_items_delete_and_clear(comfy_server):
    url = comfy_server.url
    ids = [post_prompt(url, small_graph(seed=s)) for s in (11, 12)]
    for prompt_id in ids:
        wait_for_history(url, prompt_id)
    last = httpx.get(url + "/history", params={"max_items": 1}).json()
    assert list(last) == [ids[-1]]
    httpx.post(url + "/history", json={"delete": [ids[0]]})
    assert httpx.get(f"{url}/history/{ids[0]}").json() == {}
    assert ids[1] in httpx.get(url + "/history").json()
    httpx.post(url + "/history", json={"clear": True})
    assert httpx.get(url + "/history").json() == {}


def test_invalid_prompts_get_comfyuis_400(comfy_server):
    r = httpx.post(comfy_server.url + "/prompt", json={"client_id": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "no_prompt"
    graph = small_graph()
    graph["7"]["inputs"]["steps"] = 0
    r = httpx.post(comfy_server.url + "/prompt", json={"prompt": graph})
    assert r.status_code == 400 and r.json()["node_errors"]["7"]["errors"][0]["type"] == "value_smaller_than_min"
    graph = small_graph()
    graph["9"]["inputs"]["filename_prefix"] = "../../escape"
    r = httpx.post(comfy_server.url + "/prompt", json={"prompt": graph})
    assert r.status_code == 400 and "outside the output folder" in r.text


# ---------------------------------------------------------------------- files

def png_bytes(color, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_uploads_are_renamed_unless_overwrite_and_loadimage_reads_them(comfy_server):
    url = comfy_server.url
    name = f"upload-{uuid.uuid4().hex[:8]}.png"

    def upload(data, **fields):
        r = httpx.post(url + "/upload/image", files={"image": (name, data, "image/png")}, data=fields)
        assert r.status_code == 200, r.text
        return r.json()

    assert upload(png_bytes("red")) == {"name": name, "subfolder": "", "type": "input"}
    assert upload(png_bytes("red"))["name"] == name  # the same bytes again: reused, not duplicated
    renamed = upload(png_bytes("blue"))["name"]
    assert renamed == name.replace(".png", " (1).png")
    assert upload(png_bytes("green"), overwrite="true")["name"] == name
    assert upload(png_bytes("white"), subfolder="people")["subfolder"] == "people"
    r = httpx.post(url + "/upload/image", files={"image": ("x.png", png_bytes("red"), "image/png")},
                   data={"subfolder": "../../outside"})
    assert r.status_code == 400
    r = httpx.post(url + "/upload/image", files={"image": ("fake.png", b"not an image at all", "image/png")})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_image"

    assert name in httpx.get(url + "/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "echo/loaded"}}}
    entry = wait_for_history(url, post_prompt(url, graph))
    image = entry["outputs"]["2"]["images"][0]
    assert image["subfolder"] == "echo" and image["filename"].startswith("loaded_")
    pixels = Image.open(io.BytesIO(httpx.get(url + "/view", params=image).content)).convert("RGB")
    assert pixels.getpixel((5, 5)) == (0, 128, 0)  # the overwritten green upload
    graph["1"]["inputs"]["image"] = f"people/{name}"  # a subfolder upload, by its path
    assert wait_for_history(url, post_prompt(url, graph))["status"]["status_str"] == "success"


def test_view_refuses_names_that_leave_the_folders(comfy_server):
    url = comfy_server.url
    assert httpx.get(url + "/view", params={"filename": "../../etc/passwd"}).status_code == 400
    assert httpx.get(url + "/view", params={"filename": "/etc/passwd"}).status_code == 400
    assert httpx.get(url + "/view", params={"filename": "passwd", "subfolder": "../../../etc"}).status_code == 403
    assert httpx.get(url + "/view", params={"filename": "x.png", "type": "elsewhere"}).status_code == 400
    assert httpx.get(url + "/view", params={"filename": "nothing-here.png"}).status_code == 404


def test_saved_pngs_carry_prompt_and_workflow_and_view_converts(comfy_server):
    url = comfy_server.url
    workflow = {"nodes": [], "links": [], "version": 0.4}
    prompt_id = post_prompt(url, small_graph(), extra_data={"extra_pnginfo": {"workflow": workflow}})
    image = wait_for_history(url, prompt_id)["outputs"]["9"]["images"][0]
    saved = Image.open(io.BytesIO(httpx.get(url + "/view", params=image).content))
    assert json.loads(saved.text["workflow"]) == workflow and json.loads(saved.text["prompt"])["9"]
    preview = httpx.get(url + "/view", params={**image, "preview": "jpeg;80"})
    assert preview.headers["content-type"] == "image/jpeg"
    alpha = Image.open(io.BytesIO(httpx.get(url + "/view", params={**image, "channel": "a"}).content))
    assert alpha.mode == "RGBA" and alpha.getchannel("A").getextrema() == (255, 255)


def test_model_lists_and_server_info_in_comfyuis_shapes(comfy_server):
    url = comfy_server.url
    assert {"checkpoints", "loras", "vae", "diffusion_models", "unet"} <= set(httpx.get(url + "/models").json())
    assert httpx.get(url + "/models/checkpoints").json() == ["flux1-dev-fp8.safetensors"]
    assert httpx.get(url + "/models/unet").json() == httpx.get(url + "/models/diffusion_models").json()
    assert httpx.get(url + "/models/nope").status_code == 404
    assert httpx.get(url + "/extensions").json() == [] and httpx.get(url + "/api/embeddings").json() == []
    assert httpx.get(url + "/features").json()["max_upload_size"] > 0
    stats = httpx.get(url + "/system_stats").json()
    assert {"os", "ram_total", "ram_free", "python_version", "pytorch_version"} <= set(stats["system"])
    assert {"name", "type", "vram_total", "vram_free"} <= set(stats["devices"][0])


# ---------------------------------------------------------------------- async jobs

def test_prefer_respond_async_gives_a_job_with_events_and_history(comfy_server):
    url = comfy_server.url
    running = post_prompt(url, slow_graph())  # so the job is still waiting when the stream opens
    wait_until_running(url, running)
    r = httpx.post(url + "/flux-dev", json=SMALL, headers={"Prefer": "respond-async"})
    assert r.status_code == 202 and r.headers["preference-applied"] == "respond-async"
    job = r.json()
    assert job["status"] == "pending"
    threading.Timer(1.0, lambda: httpx.post(url + "/interrupt", json={"prompt_id": running})).start()
    assert r.headers["location"] == job["status_url"] == f"{url}/jobs/{job['job_id']}"
    events = []
    with httpx.stream("GET", job["events_url"], timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[5:])))
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and names.count("progress") == 4
    done = events[-1][1]
    assert done["status"] == "success" and done["result"]["images"][0]["seed"] == 3
    image = httpx.get(done["result"]["images"][0]["url"])
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert httpx.get(job["status_url"]).json()["status"] == "success"
    # The same job is a ComfyUI prompt: in the history under its id.
    assert httpx.get(f"{url}/history/{job['job_id']}").json()[job["job_id"]]["status"]["completed"]
    # A late subscriber gets the final event at once.
    late = httpx.get(job["events_url"], timeout=10).text
    assert late.startswith("event: done")


def test_delete_job_cancels_a_pending_and_a_running_job(comfy_server):
    url = comfy_server.url
    running = post_prompt(url, slow_graph())
    wait_until_running(url, running)
    r = httpx.post(url + "/workflow", json={"prompt": small_graph()}, headers={"Prefer": "respond-async"})
    pending = r.json()["job_id"]
    assert httpx.delete(f"{url}/jobs/{pending}").json()["status"] == "cancelled"
    stopped = httpx.delete(f"{url}/jobs/{running}", timeout=30).json()
    assert stopped["status"] == "interrupted"
    assert httpx.delete(f"{url}/jobs/{running}").status_code == 409
    assert httpx.get(f"{url}/jobs/not-a-job").status_code == 404


class Receiver(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_is_called_once_and_private_targets_are_refused_by_default(comfy_server, server):
    receiver = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    Receiver.received.clear()
    try:
        r = httpx.post(comfy_server.url + "/flux-dev", json={**SMALL, "webhook": hook},
                       headers={"Prefer": "respond-async"})
        job_id = r.json()["job_id"]
        deadline = time.time() + 30
        while not Receiver.received and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert len(Receiver.received) == 1
        assert Receiver.received[0]["job_id"] == job_id and Receiver.received[0]["status"] == "success"
        assert Receiver.received[0]["result"]["images"][0]["url"].startswith(comfy_server.url)
    finally:
        receiver.shutdown()
    # The default server refuses loopback and private targets before queueing anything.
    for target in (hook, "http://10.1.2.3/hook", "http://[::1]:9/x", "ftp://example.com/x"):
        r = httpx.post(server.url + "/flux-dev", json={**SMALL, "webhook": target})
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_webhook", target


def test_queue_limit_applies_to_prompt_and_async_submissions(comfy_server):
    url = comfy_server.url
    running = post_prompt(url, slow_graph())
    wait_until_running(url, running)
    accepted = [post_prompt(url, small_graph(seed=s)) for s in range(4)]  # --max-queue 4
    r = httpx.post(url + "/prompt", json={"prompt": small_graph()})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    r = httpx.post(url + "/flux-dev", json=SMALL, headers={"Prefer": "respond-async"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "queue_full"
    httpx.post(url + "/queue", json={"clear": True})
    httpx.post(url + "/interrupt")
    wait_for_history(url, running)
    assert all(httpx.get(f"{url}/history/{i}").json() == {} for i in accepted)


# ---------------------------------------------------------------------- the API key

def test_the_api_key_guards_comfyuis_routes_and_the_websocket(keyed_server):
    import websocket
    from comfy_api_simplified import ComfyApiWrapper

    url = keyed_server.url
    assert httpx.post(url + "/prompt", json={"prompt": small_graph()}).status_code == 401
    assert httpx.get(url + "/history").status_code == 401
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url + "/prompt", json={"prompt": small_graph()}, headers=bearer).status_code == 200
    # HTTP Basic with the key as the password: comfy-api-simplified's user/password.
    api = ComfyApiWrapper(url, user="studio", password=KEY)
    assert "queue_running" in api.get_queue()
    host = url.removeprefix("http://")
    with pytest.raises(websocket.WebSocketException):
        ws = websocket.create_connection(f"ws://{host}/ws?clientId=a", timeout=5)
        ws.recv()
    ws = websocket.create_connection(f"ws://{host}/ws?clientId=a&token={KEY}", timeout=5)
    assert json.loads(ws.recv())["type"] == "status"
    ws.close()
    ws = websocket.create_connection(f"ws://{host}/ws?clientId=b", header=[f"Authorization: Bearer {KEY}"], timeout=5)
    assert json.loads(ws.recv())["type"] == "status"
    ws.close()


def test_upload_mask_puts_the_masks_alpha_on_the_original(comfy_server):
    url = comfy_server.url
    name = f"base-{uuid.uuid4().hex[:8]}.png"
    httpx.post(url + "/upload/image", files={"image": (name, png_bytes("red"), "image/png")})
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    mask.putalpha(Image.new("L", (64, 64), 40))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    r = httpx.post(url + "/upload/mask", files={"image": ("clipspace-mask.png", buffer.getvalue(), "image/png")},
                   data={"original_ref": json.dumps({"filename": name, "subfolder": "", "type": "input"})})
    assert r.status_code == 200, r.text
    stored = r.json()
    composed = Image.open(io.BytesIO(httpx.get(url + "/view", params={"filename": stored["name"],
                                                                      "type": "input"}).content))
    assert composed.mode == "RGBA" and composed.getpixel((3, 3)) == (255, 0, 0, 40)
    r = httpx.post(url + "/upload/mask", files={"image": ("m.png", buffer.getvalue(), "image/png")},
                   data={"original_ref": json.dumps({"filename": "../../x.png"})})
    assert r.status_code in (400, 403)


def test_output_folder_is_pruned_oldest_first(tmp_path):
    import os

    from ryla.api.storage import DataFolders

    folders = DataFolders(tmp_path, max_output_bytes=3000, max_output_age_s=3600)
    image = Image.effect_noise((32, 32), 64).convert("RGB")
    stored = [folders.save_png(image, "output", "run/shot", {"1": {}}, None) for _ in range(4)]
    assert [s.filename for s in stored] == [f"shot_{n:05}_.png" for n in range(1, 5)]
    paths = [tmp_path / "output" / "run" / s.filename for s in stored]
    for age, path in zip((400, 300, 200, 100), paths):  # the first is the oldest
        os.utime(path, (time.time() - age,) * 2)
    size = paths[0].stat().st_size
    folders.max_output_bytes = 2 * size
    assert folders.prune_outputs() == 2
    assert [p.exists() for p in paths] == [False, False, True, True]
    os.utime(paths[2], (time.time() - 7200,) * 2)  # older than the age limit
    assert folders.prune_outputs() == 1 and not paths[2].exists() and paths[3].exists()
    # The counter goes on past the highest name, never reusing one.
    assert folders.save_png(image, "output", "run/shot", None, None).filename == "shot_00005_.png"


def test_webhook_delivery_retries_until_accepted():
    import asyncio

    from ryla.api import webhooks
    from ryla.api.jobs import Job

    answers = [500, 204]
    calls = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(answers.pop(0))
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = http.server.HTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()

    class Settings:
        allow_private_webhooks = True

    async def run():
        job = Job(id="j1", number=0, endpoint="flux-dev", request_id="r1", graph={}, extra_data={},
                  outputs_to_execute=[], node_types={}, status="success",
                  webhook=f"http://127.0.0.1:{receiver.server_address[1]}/hook")
        return await webhooks.deliver(job, Settings())

    old = webhooks.FIRST_BACKOFF_S
    webhooks.FIRST_BACKOFF_S = 0.05
    try:
        assert asyncio.run(run()) is True
    finally:
        webhooks.FIRST_BACKOFF_S = old
        receiver.shutdown()
    assert len(calls) == 2 and calls[0]["job_id"] == "j1" and calls[1]["status"] == "success"

    class Strict:
        allow_private_webhooks = False

    with pytest.raises(webhooks.WebhookRefused, match="non-public"):
        asyncio.run(webhooks.check_target("http://localhost:9/x", Strict.allow_private_webhooks))


def test_a_finished_jobs_images_leave_memory_but_its_files_stay(runtime, monkeypatch, tmp_path):
    """The history keeps many jobs; their in-memory images (megabytes each) go after a while."""
    from starlette.testclient import TestClient

    from ryla.api import service as service_module
    from ryla.api.app import ServerSettings, create_app

    monkeypatch.setattr(service_module, "RESULT_KEEP_S", 0.2)
    app = create_app(runtime, ServerSettings(preload=False, data_dir=tmp_path))
    with TestClient(app) as client:
        response = client.post("/flux-dev", json=SMALL, headers={"Accept": "application/json"})
        assert response.status_code == 200
        job = app.state.service.jobs.get(response.json()["job_id"])
        deadline = time.time() + 5
        while job.result is not None and time.time() < deadline:
            time.sleep(0.05)
        assert job.result is None and job.status == "success"
        image = client.get("/jobs/" + job.id).json()["result"]["images"][0]
        assert client.get("/view", params={k: image[k] for k in ("filename", "subfolder", "type")}).status_code == 200
    app.state.service.queue.close()
