"""What the server is and holds: health, the model store, supported nodes, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ryla.api.errors import ApiError
from ryla.api.schemas import HealthResponse
from ryla.api.service import Service, get_service
from ryla.graph.executor import RunContext

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthResponse)
async def health(service: Service = Depends(get_service)) -> dict:
    runtime = service.runtime
    return {"status": "ok", "model_set": "tiny" if runtime.store.tiny else "real",
            "models_dir": str(runtime.store.root), "loaded_models": runtime.engine.loaded_models(),
            "queue_depth": service.queue.depth, "device": str(runtime.engine.device),
            "speed": runtime.engine.speed_info}


@router.get("/models", summary="Model files in the store, by folder")
async def models(service: Service = Depends(get_service)) -> dict:
    store = service.runtime.store
    return {"models_dir": str(store.root), "tiny": store.tiny, "folders": store.inventory()}


@router.get("/object_info", summary="Supported nodes, in ComfyUI's /object_info shape")
async def object_info(service: Service = Depends(get_service)) -> dict:
    runtime = service.runtime
    return runtime.registry.object_info(RunContext(engine=runtime.engine))


@router.get("/object_info/{node_class}")
async def object_info_node(node_class: str, service: Service = Depends(get_service)) -> dict:
    runtime = service.runtime
    if node_class not in runtime.registry:
        raise ApiError(404, "not_found", f"no node class {node_class!r}")
    return {node_class: runtime.registry.object_info(RunContext(engine=runtime.engine))[node_class]}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(service: Service = Depends(get_service)) -> Response:
    service.metrics.queue_depth.set(service.queue.depth)
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
