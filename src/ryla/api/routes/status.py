"""What the server is and holds: health, the model store, metrics. (ComfyUI's /object_info and
/models are in ryla.api.routes.comfy.)"""

from __future__ import annotations

from pathlib import PurePath

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ryla.api.auth import key_matches
from ryla.api.schemas import HealthResponse
from ryla.identity.faces import backend_name
from ryla.api.service import Service, get_service

router = APIRouter(tags=["service"])


@router.head("/health", include_in_schema=False)
@router.get("/health", response_model=HealthResponse)
async def health(request: Request, service: Service = Depends(get_service)) -> dict:
    """Public (a load balancer asks it), so without the API key it shows no file paths."""
    runtime = service.runtime
    key = service.settings.api_key
    trusted = key is None or key_matches(request.headers.get("authorization", ""), key)
    loaded = runtime.engine.loaded_models()
    if not trusted:
        loaded = [_without_path(name) for name in loaded]
    return {"status": "ok", "model_set": "tiny" if runtime.store.tiny else "real",
            "models_dir": str(runtime.store.root) if trusted else None, "loaded_models": loaded,
            "queue_depth": service.queue.depth, "device": str(runtime.engine.device),
            "speed": runtime.engine.speed_info, "face_analysis": backend_name(runtime.store),
            "safety": service.safety.describe(), "parallel": runtime.describe_parallel()}


def _without_path(name: str) -> str:
    """'transformer:/models/checkpoints/flux1-dev-fp8.safetensors' -> 'transformer:flux1-dev-fp8.safetensors'."""
    kind, sep, path = name.partition(":")
    return f"{kind}{sep}{PurePath(path).name}" if sep else PurePath(name).name


@router.get("/store", summary="Model files in the store, by folder (ComfyUI's /models lists folder names)")
async def store_inventory(service: Service = Depends(get_service)) -> dict:
    store = service.runtime.store
    return {"models_dir": str(store.root), "tiny": store.tiny, "folders": store.inventory()}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(service: Service = Depends(get_service)) -> Response:
    service.metrics.queue_depth.set(service.queue.depth)
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
