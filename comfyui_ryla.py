"""ryla on Modal: the whole API (/flux-dev, /flux-lora, /workflow, /loras, /health, ...) on
autoscaling GPU containers, with models on Volumes.

The file keeps the spec's name (EP-058: `modal deploy comfyui_ryla.py`), but runs no ComfyUI
server: the same FastAPI app and engine as `ryla serve` run in-process, and execute the same
ComfyUI API-format workflows.

    modal run comfyui_ryla.py::download --preset all   # once: weights onto the ryla-models Volume
    modal deploy comfyui_ryla.py                       # the API, at the URL Modal prints

Settings, read when you deploy (see docs/deploy-modal.md):
    RYLA_GPU           GPU type (default H100; "A100-80GB", "L40S", "H200" ...)
    RYLA_SPEED         exact | fast | turbo | eager (default exact)
    RYLA_API_KEY       if set, every route but /health needs `Authorization: Bearer <key>`
    RYLA_PROXY_AUTH=1  use Modal proxy auth instead (Modal-Key / Modal-Secret headers)
    HF_TOKEN           for the gated FLUX.1-dev files; else the Modal Secret "huggingface-secret"
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

MINUTES = 60  # seconds
PROJECT = Path(__file__).resolve().parent

GPU = os.environ.get("RYLA_GPU", "H100")
SPEED = os.environ.get("RYLA_SPEED", "exact")
MAX_INPUTS = 5  # concurrent requests per container; they queue for the GPU inside it
SCALEDOWN_WINDOW = 5 * MINUTES  # keep a warm container this long after the last request
PROXY_AUTH = os.environ.get("RYLA_PROXY_AUTH") == "1"

MODELS_DIR = "/models"  # the model store: checkpoints/, loras/, ... (Volume "ryla-models")
HF_CACHE_DIR = "/hf-cache"  # huggingface_hub's cache (Volume "hf-hub-cache")
COMPILE_CACHE_DIR = "/compile-cache"  # torch.compile artifacts (Volume "ryla-compile-cache")

models_volume = modal.Volume.from_name("ryla-models", create_if_missing=True)
hf_cache_volume = modal.Volume.from_name("hf-hub-cache", create_if_missing=True)
compile_cache_volume = modal.Volume.from_name("ryla-compile-cache", create_if_missing=True)
VOLUMES = {MODELS_DIR: models_volume, HF_CACHE_DIR: hf_cache_volume, COMPILE_CACHE_DIR: compile_cache_volume}

# The project installed from its source; its pyproject pins every dependency. No weights in
# the image: they live on the Volume.
image = (
    modal.Image.debian_slim(python_version="3.11")
    .add_local_dir(PROJECT, "/opt/ryla", copy=True,
                   ignore=["**/__pycache__", ".git", ".whl", "bench/results", "tests", "*.jpg", "*.png"])
    # [identity]: insightface + onnxruntime-gpu for antelopev2 face analysis; [gpu]: cuDNN's
    # fp8 attention for the `fast` speed mode.
    .run_commands('pip install "/opt/ryla[identity,gpu]"')
    .env({"HF_HOME": HF_CACHE_DIR, "RYLA_MODELS_DIR": MODELS_DIR, "RYLA_COMPILE_CACHE": COMPILE_CACHE_DIR,
          "HF_XET_HIGH_PERFORMANCE": "1"})
)

hf_secret = (modal.Secret.from_local_environ(["HF_TOKEN"]) if os.environ.get("HF_TOKEN")
             else modal.Secret.from_name("huggingface-secret"))
api_secrets = [modal.Secret.from_local_environ(["RYLA_API_KEY"])] if os.environ.get("RYLA_API_KEY") else []

app = modal.App("ryla")


@app.function(image=image, volumes=VOLUMES, secrets=[hf_secret], timeout=60 * MINUTES)
def download(preset: str = "all") -> list[str]:
    """Fill the ryla-models Volume: presets flux-dev, identity, flux-dev-transformer, all.
    Files already present and verified are not fetched again."""
    from ryla.models.download import download as fetch_preset
    from ryla.models.store import ModelStore

    results = fetch_preset(ModelStore(MODELS_DIR), preset)
    models_volume.commit()
    return [f"{'downloaded' if r.downloaded else 'present'}: {r.path} ({r.size} bytes)" for r in results]


def hf_download_flux_dev() -> list[str]:
    """The spec's TSK-058-001-001, as a remote call: FLUX.1-dev files onto the Volume."""
    return download.remote("flux-dev")


def hf_download_instantid() -> list[str]:
    """The spec's TSK-058-002-002: the identity (InfiniteYou) files onto the Volume."""
    return download.remote("identity")


@app.cls(gpu=GPU, image=image, volumes=VOLUMES, secrets=api_secrets, scaledown_window=SCALEDOWN_WINDOW,
         timeout=15 * MINUTES, enable_memory_snapshot=True)
@modal.concurrent(max_inputs=MAX_INPUTS)
class Ryla:
    @modal.enter(snap=True)
    def import_libraries(self):
        # Runs before the memory snapshot: the slow imports (torch, diffusers' and transformers'
        # model code, torch.compile's) are restored from the snapshot instead of repeated on
        # every cold start. Imports only: no GPU is attached while the snapshot is taken.
        from ryla.api import app as api_app  # noqa: F401
        from ryla.flux.engine import import_model_code

        import_model_code(SPEED)

    @modal.enter(snap=False)
    def load_models(self):
        from ryla.api.app import ServerSettings, create_app
        from ryla.runtime import Runtime

        models_volume.reload()  # see files added since this container's snapshot
        self.runtime = Runtime.open(MODELS_DIR, speed=SPEED)
        # A LoRA uploaded here is committed for the other containers; a LoRA uploaded
        # elsewhere is found by reloading the Volume before answering "not found".
        self.runtime.loras.on_change = models_volume.commit
        self.runtime.loras.on_miss = models_volume.reload
        self.web_app = create_app(self.runtime, ServerSettings.from_env())

    @modal.asgi_app(requires_proxy_auth=PROXY_AUTH)
    def api(self):
        return self.web_app
