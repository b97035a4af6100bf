"""What the server is and holds: health, the model store, metrics. (ComfyUI's /object_info and
/models are in ryla.api.routes.comfy.)"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ryla.api.schemas import HealthResponse
from ryla.api.service import Service, get_service

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthResponse)
async def health(service: Service = Depends(get_service)) -> dict:
    runtime = service.runtime
    return {"status": "ok", "model_set": "tiny" if runtime.store.tiny else "real",
            "models_dir": str(runtime.store.root), "loaded_models": runtime.engine.loaded_models(),
            "queue_depth": service.queue.depth, "device": str(runtime.engine.device),
            "speed": runtime.engine.speed_info}


@router.get("/store", summary="Model files in the store, by folder (ComfyUI's /models lists folder names)")
async def store_inventory(service: Service = Depends(get_service)) -> dict:
    store = service.runtime.store
    return {"models_dir": str(store.root), "tiny": store.tiny, "folders": store.inventory()}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(service: Service = Depends(get_service)) -> Response:
    service.metrics.queue_depth.set(service.queue.depth)
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
