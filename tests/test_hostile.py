"""Hostile and careless input against a live `ryla serve`, class by class: mutated and bomb
images, hostile LoRA files, racing uploads, a corrupted LoRA store, deep and cyclic graphs,
costly graphs, header-breaking text, malformed bodies, cross-origin and rebinding requests, a
server killed during an upload. For each class: no 500, no dropped connection, the documented
error type, /health answering within a second throughout, and the server's memory back within a
bound afterwards."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import lora_files
from conftest import Server, free_port
from ryla.workflows import FLUX_DEV

MAX_IMAGE_PIXELS = 1_000_000
SMALL = {"prompt": "a fox", "width": 64, "height": 64, "steps": 1, "seed": 1}
# Every error type a client may see from these routes (docs/api.md's table).
DOCUMENTED = {"invalid_request", "invalid_image", "image_too_large", "invalid_json", "invalid_lora",
              "invalid_lora_id", "lora_not_found", "lora_exists", "limit_exceeded", "shape_mismatch",
              "prompt_outputs_failed_validation", "invalid_prompt", "prompt_no_outputs", "no_images",
              "payload_too_large", "no_face_detected", "upload_incomplete", "cross_origin", "host_not_allowed",
              "timeout", "queue_full", "not_found"}


class Watch:
    """Polls /health in the background: the longest answer and any failure."""

    def __init__(self, url: str):
        self.url, self.slowest, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.25):
            start = time.perf_counter()
            try:
                status = httpx.get(self.url + "/health", timeout=5).status_code
                if status != 200:
                    self.failures.append(status)
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.slowest = max(self.slowest, time.perf_counter() - start)

    def stop(self):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def hostile(server_env, tmp_path_factory):
    models = tmp_path_factory.mktemp("hostile-store")
    env = {**server_env, "RYLA_MODELS_DIR": str(models), "RYLA_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
           "RYLA_MAX_LORA_BYTES": str(20_000_000)}
    srv = Server(env, "--timeout", "3", "--max-queue", "16",
                 log_path=tmp_path_factory.mktemp("logs") / "hostile.log")
    srv.models = models
    srv.env = env
    yield srv
    srv.stop()


@pytest.fixture()
def guarded(hostile):
    """Around one class of hostile input: /health stays fast, and memory comes back."""
    process = psutil.Process(hostile.process.pid)
    before = process.memory_info().rss
    watch = Watch(hostile.url)
    yield hostile
    watch.stop()
    assert not watch.failures, watch.failures
    assert watch.slowest < 1.0, f"/health took {watch.slowest:.2f}s"
    grown = process.memory_info().rss - before
    assert grown < 400 * 2**20, f"the server kept {grown / 2**20:.0f} MiB after this class"
    assert "Traceback" not in hostile.log(), hostile.log()[-3000:]


def assert_documented(response: httpx.Response, *allowed: int):
    assert response.status_code < 500 or response.status_code == 504, response.text[:500]
    if allowed:
        assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert response.json()["error"]["type"] in DOCUMENTED, response.text[:300]


# ---------------------------------------------------------------------- images

def encoded(fmt: str, size=(32, 32), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def echo_graph(name: str = "photo") -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "echo"}}}


def post_image(url: str, data: bytes | str) -> httpx.Response:
    payload = data if isinstance(data, str) else base64.b64encode(data).decode()
    return httpx.post(url + "/workflow", json={"prompt": echo_graph(), "images": {"photo": payload}},
                      headers={"Accept": "application/json"}, timeout=30)


BASES = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP")}


@st.composite
def mutated_images(draw):
    data = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def test_mutated_png_jpeg_webp_files_get_422_or_an_image(guarded):
    url = guarded.url

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(mutated_images())
    def check(data):
        response = post_image(url, data)
        assert_documented(response, 200, 422)
        if response.status_code == 422:
            assert response.json()["error"]["type"] == "invalid_image"

    check()


def png_of_size(width: int, height: int) -> bytes:
    """A valid PNG of all-black pixels that compresses to almost nothing (an 'image bomb')."""
    raw = b"".join(b"\x00" + b"\x00" * (3 * width) for _ in range(height))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def test_image_bombs_are_refused_from_the_header_at_the_limit(guarded):
    at_limit = png_of_size(1000, 1000)  # exactly MAX_IMAGE_PIXELS
    over = png_of_size(1001, 1000)
    assert len(over) < 20_000
    assert_documented(post_image(guarded.url, at_limit), 200)
    response = post_image(guarded.url, over)
    assert_documented(response, 422)
    assert "over the limit of 1000000" in response.json()["error"]["message"]
    huge = png_of_size(40000, 1)[:0] or b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + struct.pack(
        ">IIBBBBB", 65000, 65000, 8, 2, 0, 0, 0) + b"\x00" * 4  # a header claiming 4.2 gigapixels
    assert_documented(post_image(guarded.url, huge), 422)


def test_odd_but_valid_images_become_rgb_the_right_way(guarded):
    def decoded(response):
        image = response.json()["images"][0]
        return Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB")

    # 16-bit grey: scaled to 8 bits, not clipped to white.
    grey16 = Image.new("I;16", (16, 16), 32768)
    buffer = io.BytesIO()
    grey16.save(buffer, "PNG")
    assert decoded(post_image(guarded.url, buffer.getvalue())).getpixel((2, 2)) == (128, 128, 128)
    # EXIF orientation applied: a 20x10 photo tagged "rotate 90" arrives 10x20.
    photo = Image.new("RGB", (20, 10), (200, 0, 0))
    exif = photo.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", exif=exif)
    assert decoded(post_image(guarded.url, buffer.getvalue())).size == (10, 20)
    # Palette, CMYK, grey with alpha, an animated WebP: all decode.
    for mode, fmt in (("P", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG"), ("RGBA", "WEBP")):
        assert_documented(post_image(guarded.url, encoded(fmt, mode=mode)), 200)
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    assert decoded(post_image(guarded.url, buffer.getvalue())).getpixel((4, 4))[0] > 200  # the first frame
    # base64 with line breaks, and the URL-safe alphabet without padding.
    data = encoded("PNG")
    text = base64.b64encode(data).decode()
    wrapped = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert_documented(post_image(guarded.url, "data:image/png;base64," + wrapped), 200)
    assert_documented(post_image(guarded.url, base64.urlsafe_b64encode(data).decode().rstrip("=")), 200)
    response = post_image(guarded.url, "%%% not base64 %%%")
    assert_documented(response, 422)


# ---------------------------------------------------------------------- LoRA files and the store

def upload(url, data: bytes, lora_id: str, trigger: str | None = None) -> httpx.Response:
    fields = {"id": lora_id, **({"trigger_word": trigger} if trigger is not None else {})}
    return httpx.post(url + "/loras", files={"file": (f"{lora_id}.safetensors", data)}, data=fields, timeout=60)


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


@pytest.fixture(scope="module")
def good_lora(hostile, tiny_store, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("lora") / "good.safetensors"
    lora_files.write(lora_files.make_lora(tiny_store, 5), "kohya", path)
    return path.read_bytes()


def hostile_loras(good: bytes) -> dict[str, bytes]:
    import torch
    from safetensors.torch import load

    tensors = load(good)
    down_key = next(k for k in tensors if k.endswith("lora_down.weight"))
    alpha_key = down_key.replace("lora_down.weight", "alpha")
    nan = dict(tensors)
    nan[down_key] = tensors[down_key].clone()
    nan[down_key][0, 0] = float("nan")
    vector_alpha = {**tensors, alpha_key: torch.ones(3)}
    rank0 = {**tensors, down_key: tensors[down_key][:0], down_key.replace("down", "up"):
             tensors[down_key.replace("down", "up")][:, :0]}
    return {
        "random-bytes": os.urandom(5000),
        "truncated": good[: len(good) // 2],
        "huge-header": struct.pack("<Q", 2**60) + b"{}",
        "header-not-json": struct.pack("<Q", 10) + b"not json!!" + b"\x00" * 64,
        "nan-values": safetensors_bytes(nan),
        "vector-alpha": safetensors_bytes(vector_alpha),
        "rank-zero": safetensors_bytes(rank0),
        "wrong-shapes": safetensors_bytes({k: (v[:, :3] if v.ndim == 2 else v) for k, v in tensors.items()}),
        "no-lora-keys": safetensors_bytes({"foo.weight": torch.ones(2, 2)}),
    }


def test_hostile_lora_files_are_refused_with_422(guarded, good_lora):
    for name, data in hostile_loras(good_lora).items():
        response = upload(guarded.url, data, f"bad-{name}")
        assert_documented(response, 422)
        assert response.json()["error"]["type"] == "invalid_lora", (name, response.text)
    assert not [p for p in (guarded.models / "loras").iterdir() if p.name.startswith("bad-")]
    assert upload(guarded.url, good_lora, "fine").status_code == 201
    # Uploads landed in RYLA_MODELS_DIR (which has no weights), not in the shared tiny set.
    assert (guarded.models / "loras" / "fine.safetensors").is_file()


def test_trigger_words_with_control_characters_are_refused(guarded, good_lora):
    for word in ("two\nlines", "tab\there", "bell\x07"):
        response = upload(guarded.url, good_lora, "trigger-test", word)
        assert_documented(response, 422)
    assert upload(guarded.url, good_lora, "trigger-test", "ohwx person").status_code == 201


def test_simultaneous_uploads_to_one_id_give_exactly_one_201(guarded, good_lora):
    url = guarded.url
    for attempt in range(20):
        lora_id = f"race-{attempt}"
        barrier = threading.Barrier(2)

        def send(_):
            barrier.wait()
            return upload(url, good_lora, lora_id).status_code

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            statuses = sorted(pool.map(send, range(2)))
        assert statuses == [201, 409], (attempt, statuses)
    listed = [e["id"] for e in httpx.get(url + "/loras").json()["loras"]]
    assert sum(lora_id.startswith("race-") for lora_id in listed) == 20


def test_a_corrupted_store_is_listed_around_and_its_entries_refused(guarded, good_lora, tmp_path):
    folder = guarded.models / "loras"
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(good_lora)
    (tmp_path / "secret.json").write_text(json.dumps({"id": "x", "trigger_word": "leaked"}))
    (folder / "dangling.safetensors").symlink_to(tmp_path / "nothing-here.safetensors")
    (folder / "outside.safetensors").symlink_to(outside)
    (folder / "garbage.safetensors").write_bytes(os.urandom(3000))
    (folder / "badmeta.safetensors").write_bytes(good_lora)
    (folder / "badmeta.json").write_bytes(b"\xff{not json")
    (folder / "linkmeta.safetensors").write_bytes(good_lora)
    (folder / "linkmeta.json").symlink_to(tmp_path / "secret.json")
    response = httpx.get(guarded.url + "/loras")
    assert_documented(response, 200)
    listed = {e["id"]: e for e in response.json()["loras"]}
    assert "dangling" not in listed and "outside" not in listed
    assert listed["badmeta"]["trigger_word"] is None and listed["linkmeta"]["trigger_word"] is None
    for lora_id in ("dangling", "outside", "garbage"):
        r = httpx.post(guarded.url + "/flux-lora", json={**SMALL, "lora_id": lora_id}, timeout=60)
        assert_documented(r, 422)
        assert r.json()["error"]["type"] == "invalid_lora", (lora_id, r.text)
    for link in ("dangling", "outside", "linkmeta"):
        (folder / f"{link}.safetensors").unlink(missing_ok=True)
    (folder / "linkmeta.json").unlink()


def test_a_lora_deleted_while_its_request_waits_gets_404(guarded, good_lora):
    url = guarded.url
    assert upload(url, good_lora, "soon-gone").status_code == 201
    blocker = httpx.post(url + "/flux-dev", json={**SMALL, "width": 1024, "height": 1024, "steps": 20},
                         headers={"Prefer": "respond-async"}).json()
    waiting = httpx.post(url + "/flux-lora", json={**SMALL, "lora_id": "soon-gone"},
                         headers={"Prefer": "respond-async"}).json()
    assert httpx.delete(url + "/loras/soon-gone").status_code == 204
    deadline = time.time() + 30
    while (state := httpx.get(waiting["status_url"]).json())["status"] in ("pending", "running") \
            and time.time() < deadline:
        time.sleep(0.1)
    assert state["status"] == "error" and state["error"]["type"] == "lora_not_found", state
    httpx.delete(blocker["status_url"])


# ---------------------------------------------------------------------- graphs and cost

def test_deep_cyclic_and_malformed_graphs(guarded):
    url = guarded.url
    graph = FLUX_DEV.fill(**SMALL)
    # A 5,000-node chain of FluxGuidance between the prompt and the sampler: validated and run.
    previous = ["2", 0]
    for index in range(5000):
        graph[f"g{index}"] = {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": previous}}
        previous = [f"g{index}", 0]
    graph["7"]["inputs"]["positive"] = previous
    assert_documented(httpx.post(url + "/workflow", json=graph, timeout=120), 200)
    cyclic = FLUX_DEV.fill(**SMALL)
    cyclic["3"]["inputs"]["conditioning"] = ["c", 0]
    cyclic["c"] = {"class_type": "FluxGuidance", "inputs": {"guidance": 1.0, "conditioning": ["3", 0]}}
    response = httpx.post(url + "/workflow", json=cyclic)
    assert_documented(response, 400)
    assert "dependency_cycle" in response.text
    for bad in ({"1": {"class_type": ["CheckpointLoaderSimple"], "inputs": {}}},
                {"1": {"class_type": "SaveImage", "inputs": "nope"}},
                {"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "B", "inputs": {}}}):
        response = httpx.post(url + "/workflow", json=bad)
        assert_documented(response, 400)
    assert "A, B" in response.json()["error"]["message"]  # every unknown type at once


def test_costly_graphs_are_refused_before_they_queue(guarded):
    url = guarded.url
    tiny_denoise = FLUX_DEV.fill(**SMALL)
    tiny_denoise["7"]["inputs"].update(steps=100, denoise=1e-9)
    response = httpx.post(url + "/workflow", json=tiny_denoise)
    assert_documented(response, 422)
    assert response.json()["error"]["details"]["limit"] == "max_schedule"
    big = FLUX_DEV.fill(**{**SMALL, "width": 2048, "height": 2048, "batch_size": 4})
    big["5"]["inputs"].update(width=8192, height=8192)
    response = httpx.post(url + "/workflow", json=big)
    assert_documented(response, 400, 422)
    many_samplers = FLUX_DEV.fill(**{**SMALL, "steps": 100})
    previous = "7"
    for index in range(11):  # 12 samplers in a row x 100 steps: over max_steps (1000)
        many_samplers[f"k{index}"] = {**many_samplers["7"], "inputs": {**many_samplers["7"]["inputs"],
                                                                          "latent_image": [previous, 0]}}
        previous = f"k{index}"
    many_samplers["8"]["inputs"]["samples"] = ["k10", 0]
    response = httpx.post(url + "/workflow", json=many_samplers)
    assert_documented(response, 422)
    assert response.json()["error"]["details"]["limit"] == "max_steps"


def test_a_latent_of_the_wrong_shape_is_a_422_naming_both_nodes(guarded):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev-fp8.safetensors"}},
             "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
             "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}}
    response = httpx.post(guarded.url + "/workflow", json=graph)
    assert_documented(response, 422)
    message = response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "shape_mismatch"
    assert "node 5 (EmptyLatentImage)" in message and "node 1 (CheckpointLoaderSimple)" in message


def test_time_limit_frees_the_worker_within_two_seconds(guarded):
    url = guarded.url
    slow = {**SMALL, "width": 1024, "height": 1024, "steps": 100}
    response = httpx.post(url + "/flux-dev", json=slow, timeout=30)
    assert_documented(response, 504)
    ended = time.time()
    while httpx.get(url + "/health").json()["queue_depth"] and time.time() - ended < 2:
        time.sleep(0.05)
    assert httpx.get(url + "/health").json()["queue_depth"] == 0
    # Queued behind a slow job until the limit: the 504 says it never started.
    blocker = httpx.post(url + "/flux-dev", json=slow, headers={"Prefer": "respond-async"}).json()
    response = httpx.post(url + "/flux-dev", json=SMALL, timeout=30)
    assert_documented(response, 504)
    assert "never started" in response.json()["error"]["message"] and int(response.headers["retry-after"]) >= 1
    httpx.delete(blocker["status_url"], timeout=30)


# ---------------------------------------------------------------------- text, headers, bodies

def test_header_breaking_prompts_and_paths(guarded, good_lora):
    url = guarded.url
    upload(url, good_lora, "header-lora", "ohwx")
    prompt = "line one\r\nX-Injected: yes\r\n\r\nünïcode ✓ \x00\x7f"
    response = httpx.post(url + "/flux-lora", json={**SMALL, "prompt": prompt, "lora_id": "header-lora"}, timeout=60)
    assert_documented(response, 200)
    assert "x-injected" not in response.headers
    assert "\n" not in response.headers["x-prompt"] and response.headers["x-prompt"].isascii()
    as_json = httpx.post(url + "/flux-lora", json={**SMALL, "prompt": prompt, "lora_id": "header-lora"},
                         headers={"Accept": "application/json"}, timeout=60).json()
    assert as_json["prompt"].startswith("ohwx") and "X-Injected" in as_json["prompt"]
    httpx.get(url + "/nothing%0d%0aforged-log-line")
    assert "\nforged-log-line" not in guarded.log()


def test_malformed_bodies_get_the_error_shape(guarded):
    bodies = [b'{"prompt": "\xff\xfe"}', b'{"prompt":"x","width":' + b"9" * 5000 + b"}",
              b'{"prompt":"x","w":' + b"[" * 50000 + b"]" * 50000 + b"}", b"{", b"", b"null"]
    for path in ("/flux-dev", "/workflow", "/prompt", "/v1/images/generations", "/queue", "/history"):
        for body in bodies:
            response = httpx.post(guarded.url + path, content=body, headers={"content-type": "application/json"})
            assert response.status_code < 500, (path, body[:30], response.text[:200])
            if response.status_code >= 400:
                assert {"message", "type"} <= set(response.json()["error"])
    nan = httpx.post(guarded.url + "/flux-dev", content=b'{"prompt":"x","guidance":NaN}',
                     headers={"content-type": "application/json"})
    assert nan.status_code == 422 and "NaN" in nan.json()["error"]["message"]
    boolean = httpx.post(guarded.url + "/flux-dev", json={"prompt": "x", "steps": True})
    assert boolean.status_code == 422 and "boolean" in boolean.json()["error"]["message"]
    graph = FLUX_DEV.fill(**SMALL)
    graph["7"]["inputs"]["steps"] = True
    response = httpx.post(guarded.url + "/workflow", json=graph)
    assert response.status_code == 400 and "boolean" in response.text


def test_exposure_without_a_key(guarded):
    url = guarded.url
    head = httpx.head(url + "/health")
    assert head.status_code == 200 and head.content == b""
    # Another site's page must not drive a keyless server through a visitor's browser.
    response = httpx.post(url + "/flux-dev", json=SMALL, headers={"Origin": "https://evil.example"})
    assert_documented(response, 403)
    assert response.json()["error"]["type"] == "cross_origin"
    same = httpx.post(url + "/flux-dev", json=SMALL, headers={"Origin": url})
    assert same.status_code == 200
    # DNS rebinding: a name that is not loopback's.
    rebound = httpx.get(url + "/health", headers={"Host": "attacker.example:80"})
    assert rebound.status_code == 403 and rebound.json()["error"]["type"] == "host_not_allowed"


def test_health_hides_paths_without_the_key(strict_server):
    public = httpx.get(strict_server.url + "/health").json()
    assert public["models_dir"] is None and not any("/" in name for name in public["loaded_models"])
    trusted = httpx.get(strict_server.url + "/health", headers={"Authorization": "Bearer s3cret-key"}).json()
    assert trusted["models_dir"].startswith("/")


def test_non_ascii_api_keys_work(server_env, tmp_path):
    key = "clé-ünïcødé"
    srv = Server({**server_env, "RYLA_API_KEY": key}, log_path=tmp_path / "key.log")
    try:
        raw = ("Bearer " + key).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as conn:
            conn.sendall(b"GET /store HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + raw + b"\r\n"
                         b"Connection: close\r\n\r\n")
            answer = conn.recv(100)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert httpx.get(srv.url + "/store", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        srv.stop()


def test_a_server_killed_during_an_upload_leaves_nothing_behind(server_env, good_lora, tmp_path):
    models = tmp_path / "store"
    env = {**server_env, "RYLA_MODELS_DIR": str(models)}
    srv = Server(env, log_path=tmp_path / "killed.log")
    boundary = "hostile-boundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\ncut\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.safetensors\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        yield good_lora[:4096]
        time.sleep(1.0)  # the server dies here
        yield good_lora[4096:]

    def send():
        try:
            httpx.post(srv.url + "/loras", content=body(),
                       headers={"content-type": f"multipart/form-data; boundary={boundary}"}, timeout=10)
        except httpx.HTTPError:
            pass

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)
    os.kill(srv.process.pid, signal.SIGKILL)
    srv.process.wait()
    sender.join()
    # What a killed upload can leave: the store's own temporary file and id claim.
    (models / "loras").mkdir(parents=True, exist_ok=True)
    (models / "loras" / ".upload-cut-abc.tmp").write_bytes(good_lora[:100])
    (models / "loras" / ".cut.claim").touch()
    restarted = Server(env, log_path=tmp_path / "restarted.log")
    try:
        assert sorted(p.name for p in (models / "loras").iterdir()) == []
        assert httpx.get(restarted.url + "/loras").json() == {"loras": []}
        assert upload(restarted.url, good_lora, "cut").status_code == 201
    finally:
        restarted.stop()
        srv._log.close()


def test_a_taken_port_fails_before_loading(server_env, tmp_path, server):
    import subprocess
    import sys

    port = server.port
    result = subprocess.run([sys.executable, "-m", "ryla.cli.main", "serve", "--port", str(port)], env=server_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot listen" in result.stderr
    assert free_port() != port
