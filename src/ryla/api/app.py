"""The HTTP API: `create_app(runtime, settings)` builds the FastAPI app served by `ryla serve`
and by the Modal deployment, from one router per capability (ryla.api.routes) around one
Service (the runtime, the GPU work queue, the metrics).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ryla.api import errors, playground
from ryla.api.metrics import Metrics
from ryla.api.middleware import GuardMiddleware
from ryla.api.routes import comfy, docs, editor, generate, jobs, loras, openai, status
from ryla.api.service import ServerSettings, Service
from ryla.runtime import Runtime
from ryla.workflows import FLUX_DEV

log = logging.getLogger(__name__)

__all__ = ["ServerSettings", "create_app", "preload_default_model"]


def preload_default_model(runtime: Runtime) -> bool:
    """Load the default checkpoint (/flux-dev's) on every engine and, in a compiled speed mode,
    compile the transformer for 1024x1024 and warm T5 and the VAE. Returns False when the store
    has no such checkpoint (the models then load with the first request that names one). Also
    run by the Modal app before its GPU memory snapshot, where one is taken."""
    default_checkpoint = FLUX_DEV.graph["1"]["inputs"]["ckpt_name"]
    if default_checkpoint not in runtime.store.list("checkpoints"):
        return False
    for engine in runtime.engines:  # one after another: compiling is not thread-safe
        engine.preload(default_checkpoint)
    return True


def create_app(runtime: Runtime, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings.from_env()
    metrics = Metrics()
    service = Service(runtime, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.preload:
            # Before serving, so the first request does not pay for it and /health means
            # ready. A broken file stops the server here, not at a request.
            await asyncio.to_thread(preload_default_model, runtime)
        service.folders.prune_outputs()
        if service.safety.mode != "off":
            # The checker the server promised: loaded now, so a missing package stops the start.
            await asyncio.to_thread(lambda: service.safety.checker)
        yield
        service.queue.close()

    app = FastAPI(
        title="ryla",
        summary="FLUX.1-dev image generation API: text-to-image, identity, LoRAs and ComfyUI workflows.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # ryla.api.routes.docs serves them without a CDN
    )
    docs.install(app, api_key_required=settings.api_key is not None)
    app.state.service = service
    errors.install(app)
    # The playground page is public (it holds no data; it asks for the key and sends it).
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key,
                       metrics=metrics, upload_paths={"/loras": settings.max_lora_bytes},
                       allowed_hosts=settings.allowed_hosts,
                       public_paths=("/health", "/", "/playground", "/login", *docs.PUBLIC_PATHS,
                                     *(f"/static/{name}" for name in playground.STATIC_FILES)))
    for router in (generate.router, jobs.router, loras.router, comfy.router, openai.router, playground.router,
                   status.router, docs.router, editor.router):
        app.include_router(router)
    # ComfyUI's newer frontend calls every server route under /api as well (server.py add_routes).
    app.include_router(comfy.router, prefix="/api", include_in_schema=False)
    app.include_router(editor.static_router)  # last: the editor's files under any other path
    return app
