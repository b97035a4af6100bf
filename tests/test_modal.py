"""The Modal app: imports offline, declares the deployment, and runs locally on the tiny model."""

from __future__ import annotations

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


@pytest.fixture()
def deployment(monkeypatch):
    """Import the app module fresh while recording what it declares to the Modal SDK."""
    import modal

    declared: dict = {}
    real_cls, real_concurrent = modal.App.cls, modal.concurrent

    def cls(self, **kwargs):
        declared["cls"] = kwargs
        return real_cls(self, **kwargs)

    def concurrent(**kwargs):
        declared["concurrent"] = kwargs
        return real_concurrent(**kwargs)

    monkeypatch.setattr(modal.App, "cls", cls)
    monkeypatch.setattr(modal, "concurrent", concurrent)
    monkeypatch.syspath_prepend(str(ROOT))
    sys.modules.pop("comfyui_ryla", None)
    module = importlib.import_module("comfyui_ryla")
    yield module, declared
    sys.modules.pop("comfyui_ryla", None)


def test_app_declares_gpu_volumes_concurrency_and_web_endpoint(deployment):
    module, declared = deployment
    assert declared["cls"]["gpu"] == "H100"
    assert declared["cls"]["enable_memory_snapshot"] is True
    assert 2 <= declared["cls"]["scaledown_window"] <= 3600
    assert declared["concurrent"] == {"max_inputs": 5}
    functions = module.app.registered_functions
    assert {"Ryla.*", "download"} <= set(functions)
    spec = functions["Ryla.*"]._spec_
    assert spec.gpus == "H100"
    names = {path: volume for path, volume in spec.volumes.items()}
    assert set(names) == {"/models", "/hf-cache", "/compile-cache"}
    assert "ryla-models" in repr(names["/models"]) and "hf-hub-cache" in repr(names["/hf-cache"])
    methods = module.Ryla._get_partial_functions()
    assert methods["api"]._is_web_endpoint() and not methods["load_models"]._is_web_endpoint()
    assert set(functions["download"]._spec_.volumes) == {"/models", "/hf-cache", "/compile-cache"}


def test_the_class_serves_the_api_locally_on_the_tiny_model(deployment, tiny_dir, monkeypatch):
    from starlette.testclient import TestClient

    module, _ = deployment
    calls = []
    monkeypatch.setattr(module, "MODELS_DIR", str(tiny_dir))
    # Modal's service is out of reach offline: the Volume's commit/reload are recorded.
    monkeypatch.setattr(module.models_volume, "reload", lambda: calls.append("reload"), raising=False)
    monkeypatch.setattr(module.models_volume, "commit", lambda: calls.append("commit"), raising=False)
    web_app = module.Ryla().api.local()
    with TestClient(web_app) as client:
        r = client.post("/flux-dev", json={"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 3})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert client.get("/health").json()["model_set"] == "tiny"
        missing = client.post("/flux-lora", json={"prompt": "x", "width": 64, "height": 64, "lora_id": "nobody"})
        assert missing.status_code == 404
    assert calls.count("reload") >= 2, "reload at start, and again before reporting a LoRA missing"
