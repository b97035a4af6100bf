"""The Modal app: imports offline, declares the deployment, and runs locally on the tiny model."""

from __future__ import annotations

import gc
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_without_a_token_or_network(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "HF_TOKEN"))}
    env["HOME"] = str(tmp_path)  # no ~/.modal.toml either
    result = subprocess.run([sys.executable, "-c", "import comfyui_ryla; print(comfyui_ryla.app.name)"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ryla"


def declare(monkeypatch, **env):
    """Import the app module fresh, with `env` as the deploying shell's, recording what it
    declares to the Modal SDK."""
    import modal

    for name in ("RYLA_GPU", "RYLA_SPEED", "RYLA_PROXY_AUTH", "RYLA_MAX_QUEUE", "RYLA_ALLOW_TINY",
                 "RYLA_MAX_CONTAINERS", "RYLA_API_KEY_SECRET", "RYLA_GPU_SNAPSHOT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    declared: dict = {}
    real_cls, real_concurrent, real_asgi = modal.App.cls, modal.concurrent, modal.asgi_app

    def cls(self, **kwargs):
        declared["cls"] = kwargs
        return real_cls(self, **kwargs)

    def concurrent(**kwargs):
        declared["concurrent"] = kwargs
        return real_concurrent(**kwargs)

    def asgi_app(**kwargs):
        declared["asgi_app"] = kwargs
        return real_asgi(**kwargs)

    monkeypatch.setattr(modal.App, "cls", cls)
    monkeypatch.setattr(modal, "concurrent", concurrent)
    monkeypatch.setattr(modal, "asgi_app", asgi_app)
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("comfyui_ryla", None)
    module = importlib.import_module("comfyui_ryla")
    return module, declared


@pytest.fixture()
def deployment(monkeypatch):
    yield declare(monkeypatch)
    sys.modules.pop("comfyui_ryla", None)


def test_app_declares_gpu_volumes_concurrency_and_web_endpoint(deployment):
    module, declared = deployment
    assert declared["cls"]["gpu"] == "H100"
    assert declared["cls"]["enable_memory_snapshot"] is True
    assert 2 <= declared["cls"]["scaledown_window"] <= 3600 and declared["cls"]["max_containers"] == 4
    assert declared["concurrent"] == {"max_inputs": 5}
    service = module.Ryla._get_class_service_function()
    assert service._spec_.gpus == "H100"
    names = dict(service._spec_.volumes)
    assert set(names) == {"/models", "/hf-cache", "/compile-cache"}
    assert "ryla-models" in repr(names["/models"]) and "hf-hub-cache" in repr(names["/hf-cache"])
    methods = module.Ryla._get_partial_functions()
    assert methods["api"]._is_web_endpoint() and not methods["load_models"]._is_web_endpoint()
    assert set(module.download._spec_.volumes) == {"/models", "/hf-cache", "/compile-cache"}


def test_settings_reach_the_container_and_safe_defaults_hold(monkeypatch):
    module, declared = declare(monkeypatch, RYLA_SPEED="fast", RYLA_MAX_QUEUE="3", RYLA_GPU="H100, H200",
                               RYLA_MAX_CONTAINERS="2")
    env = declared["cls"]["env"]
    assert env["RYLA_SPEED"] == "fast" and env["RYLA_MAX_QUEUE"] == "3" and env["RYLA_ALLOW_TINY"] == "0"
    assert declared["cls"]["gpu"] == ["H100", "H200"] and declared["cls"]["max_containers"] == 2
    # The API key Secret is required (required_keys), unless Modal's proxy auth is on: never neither.
    (secret,) = declared["cls"]["secrets"]
    assert "ryla-api-key" in repr(secret) and declared["asgi_app"] == {"requires_proxy_auth": False}
    module, declared = declare(monkeypatch, RYLA_PROXY_AUTH="1")
    assert declared["cls"]["secrets"] == [] and declared["asgi_app"] == {"requires_proxy_auth": True}
    assert module.parse_gpus("A100-80GB") == "A100-80GB"
    with pytest.raises(ValueError, match="Hopper"):
        declare(monkeypatch, RYLA_SPEED="turbo", RYLA_GPU="H100,A100-80GB")
    # several GPUs per container: Modal's "H100:2", replicas unless RYLA_PARALLEL says context
    module, declared = declare(monkeypatch, RYLA_GPU="H100:2", RYLA_PARALLEL="context")
    assert declared["cls"]["gpu"] == "H100:2" and module.GPUS_PER_CONTAINER == 2 and module.PARALLEL == "context"
    assert declared["cls"]["env"]["RYLA_PARALLEL"] == "context"
    for settings, message in (({"RYLA_GPU": "H100:2,H200:4"}, "different GPU counts"),
                              ({"RYLA_PARALLEL": "pipeline"}, "choose context or replicas"),
                              ({"RYLA_PARALLEL": "context", "RYLA_SPEED": "turbo"}, "exact and fast")):
        with pytest.raises(ValueError, match=message):
            declare(monkeypatch, **settings)
    sys.modules.pop("comfyui_ryla", None)


def test_the_class_serves_the_api_locally_on_the_tiny_model(deployment, tiny_dir, monkeypatch):
    from starlette.testclient import TestClient

    module, _ = deployment
    calls = []
    monkeypatch.setattr(module, "MODELS_DIR", str(tiny_dir))
    # Modal's service is out of reach offline: the Volume's commit/reload are recorded.
    monkeypatch.setattr(module.models_volume, "reload", lambda: calls.append("reload"), raising=False)
    monkeypatch.setattr(module.models_volume, "commit", lambda: calls.append("commit"), raising=False)
    with pytest.raises(RuntimeError, match="no FLUX weights"):  # the tiny model is refused by default
        module.Ryla().api.local()
    monkeypatch.setenv("RYLA_ALLOW_TINY", "1")
    web_app = module.Ryla().api.local()
    with TestClient(web_app) as client:
        r = client.post("/flux-dev", json={"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 3})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert client.get("/health").json()["model_set"] == "tiny"
        missing = client.post("/flux-lora", json={"prompt": "x", "width": 64, "height": 64, "lora_id": "nobody"})
        assert missing.status_code == 404
    assert calls.count("reload") >= 2, "reload at start, and again before reporting a LoRA missing"


def test_gpu_snapshot_loads_and_warms_the_model_before_the_snapshot(monkeypatch, tiny_dir):
    """RYLA_GPU_SNAPSHOT=1: Modal's GPU snapshot option is declared, and the snap=True hook has
    the default model loaded before the container's own start (snap=False) begins; without it
    nothing is loaded until then (a CPU snapshot has no GPU)."""
    from starlette.testclient import TestClient

    from ryla.runtime import Runtime

    opened = []
    real_open = Runtime.open.__func__
    monkeypatch.setattr(Runtime, "open", classmethod(lambda cls, *a, **k: opened.append(real_open(cls, *a, **k))
                                                     or opened[-1]))
    for snapshot in ("1", None):
        opened.clear()
        module, declared = declare(monkeypatch, **({"RYLA_GPU_SNAPSHOT": snapshot} if snapshot else {}))
        monkeypatch.setenv("RYLA_ALLOW_TINY", "1")
        assert declared["cls"].get("experimental_options") == ({"enable_gpu_snapshot": True} if snapshot else None)
        assert declared["cls"]["env"].get("RYLA_GPU_SNAPSHOT") == snapshot
        monkeypatch.setattr(module, "MODELS_DIR", str(tiny_dir))
        loaded_at_start = []
        monkeypatch.setattr(module.models_volume, "reload", lambda: loaded_at_start.append(
            opened[-1].engine.loaded_models() if opened else None), raising=False)
        web_app = module.Ryla().api.local()
        # the container's start froze what it built (ryla.startup); unfrozen for the tests after
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] < 100_000
        gc.unfreeze()
        if snapshot:
            assert "transformer:" in " ".join(loaded_at_start[0]) and len(opened) == 1  # opened once, before
        else:
            assert loaded_at_start[0] is None and len(opened) == 1
        with TestClient(web_app) as client:
            r = client.post("/flux-dev", json={"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 3})
            assert r.status_code == 200
    with pytest.raises(ValueError, match="one GPU per container"):
        declare(monkeypatch, RYLA_GPU_SNAPSHOT="1", RYLA_GPU="H100:2")
    sys.modules.pop("comfyui_ryla", None)


class FakeVolume:
    """A Modal Volume between containers: each container has its own copy of the folder; commit
    publishes it, reload replaces it with what was published. A reload fails while a file is
    open, as Modal's does."""

    def __init__(self, remote: Path):
        self.remote = remote
        self.remote.mkdir(parents=True, exist_ok=True)
        self.open_files = 0

    def commit(self, local: Path):
        import shutil

        shutil.rmtree(self.remote)
        shutil.copytree(local, self.remote)

    def reload(self, local: Path):
        import shutil

        if self.open_files:
            self.open_files -= 1
            raise RuntimeError("there are open files preventing the operation")
        shutil.rmtree(local, ignore_errors=True)
        shutil.copytree(self.remote, local)


def test_lora_changes_reach_other_containers_under_the_reload_rules(tiny_store, tmp_path):
    import lora_files
    from ryla.models.loras import LoraNotFound, LoraStore, StoreUnavailable, VolumeSync

    volume = FakeVolume(tmp_path / "volume")
    clock = {"now": 0.0}
    from ryla.flux.loading import architecture_shapes

    known = architecture_shapes(tiny_store)
    shapes = lambda: known  # noqa: E731

    def container(name):
        folder = tmp_path / name / "loras"
        folder.mkdir(parents=True)
        sync = VolumeSync(lambda: volume.reload(folder), lambda: volume.commit(folder), min_interval_s=2.0,
                          backoff_s=0.0, clock=lambda: clock["now"], sleep=lambda s: None)
        return LoraStore(folder, shapes, on_change=sync.commit, on_miss=sync.reload, on_list=sync.reload_if_stale)

    a, b = container("a"), container("b")
    lora = tmp_path / "anna.safetensors"
    lora_files.write(lora_files.make_lora(tiny_store, 3), "kohya", lora)
    a.add_file(lora, "anna")  # committed
    assert [e["id"] for e in a.list()] == ["anna"]
    assert [e["id"] for e in b.list()] == ["anna"]  # b's listing reloads first
    clock["now"] += 0.5
    b.remove("anna")  # committed by b
    assert [e["id"] for e in a.list()] == ["anna"]  # a reloaded 0.5 s ago: rate-limited, stale for now
    clock["now"] += 5
    volume.open_files = 1  # the next reload fails once, then is retried
    with pytest.raises(LoraNotFound):
        a.get("anna")  # past the interval: a lookup reloads, and the removal shows
    assert a.list() == []
    volume.open_files = 10  # keeps failing: a 503-worthy error, not a crash
    clock["now"] += 5
    with pytest.raises(StoreUnavailable) as failure:
        b.get("someone")
    assert failure.value.retry_after >= 1


def test_a_shared_store_that_cannot_reload_answers_503(runtime, monkeypatch, tmp_path):
    from starlette.testclient import TestClient

    from ryla.api.app import ServerSettings, create_app
    from ryla.models.loras import StoreUnavailable

    def unavailable():
        raise StoreUnavailable("the shared LoRA store could not reload (open files)", retry_after=4)

    monkeypatch.setattr(runtime.loras, "on_list", unavailable)
    app = create_app(runtime, ServerSettings(preload=False, data_dir=tmp_path))
    with TestClient(app) as client:
        for response in (client.get("/loras"),
                         client.post("/flux-lora", json={"prompt": "x", "width": 64, "height": 64, "lora_id": "a"})):
            assert response.status_code == 503 and response.headers["retry-after"] == "4"
            assert response.json()["error"]["type"] == "store_unavailable"
    app.state.service.queue.close()


def test_ryla_client_follows_modals_303_to_the_result_with_proxy_auth(tmp_path):
    """Modal's web endpoints answer a request still running after 150 s with 303 and a result
    URL; ryla-client follows it (with Modal's proxy-auth headers) and saves the image."""
    import base64
    import http.server
    import io
    import json
    import threading

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "JPEG")
    body = json.dumps({"images": [{"data": base64.b64encode(buffer.getvalue()).decode(), "seed": 5, "width": 8,
                                   "height": 8, "format": "jpeg"}], "request_id": "r1",
                       "timings": {"queue_s": 0.0, "generation_s": 151.0, "total_s": 151.0}}).encode()
    seen = []

    class ModalLike(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append(("POST", self.path, self.headers.get("Modal-Key"), self.headers.get("Modal-Secret")))
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(303)
            self.send_header("Location", "/__result/abc")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):  # noqa: N802
            seen.append(("GET", self.path, self.headers.get("Modal-Key"), self.headers.get("Modal-Secret")))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), ModalLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run([sys.executable, "-m", "ryla.cli.client", "--url",
                                 f"http://127.0.0.1:{server.server_address[1]}", "--modal-key", "wk-1",
                                 "--modal-secret", "ws-1", "flux-dev", "--prompt", "x", "--output",
                                 str(tmp_path / "out.jpg")], capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.jpg").size == (8, 8) and "seed 5" in result.stdout
    assert seen == [("POST", "/flux-dev", "wk-1", "ws-1"), ("GET", "/__result/abc", "wk-1", "ws-1")]
