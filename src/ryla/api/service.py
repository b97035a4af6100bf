"""Server settings and the service the routes share: validate a graph, queue it for the
GPU, wait for it (cancelling when the client leaves or the time limit passes)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ryla.api.errors import ApiError
from ryla.api.metrics import Metrics
from ryla.api.work_queue import QueueFull, WorkQueue
from ryla.flux.engine import Cancelled
from ryla.graph.executor import ExecutionError
from ryla.runtime import RunResult, Runtime

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_queue: int = 8  # requests waiting for the GPU beyond the one running
    request_timeout_s: float = 300.0
    max_body_bytes: int = 32 * MB
    max_lora_bytes: int = 2048 * MB  # a rank-128 FLUX LoRA is ~1.3 GB
    max_image_bytes: int = 10 * MB  # decoded reference / pose photo
    preload: bool = True

    @classmethod
    def from_env(cls, **overrides) -> ServerSettings:
        values: dict[str, Any] = {"api_key": os.environ.get("RYLA_API_KEY") or None}
        for name, env, cast in (("max_queue", "RYLA_MAX_QUEUE", int),
                                ("request_timeout_s", "RYLA_REQUEST_TIMEOUT", float),
                                ("max_body_bytes", "RYLA_MAX_BODY_BYTES", int),
                                ("max_lora_bytes", "RYLA_MAX_LORA_BYTES", int)):
            if os.environ.get(env):
                values[name] = cast(os.environ[env])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Timings:
    queue: float = 0.0
    generation: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"queue_s": round(self.queue, 4), "generation_s": round(self.generation, 4),
                "total_s": round(self.queue + self.generation, 4), **self.extra}


class Service:
    """What the routes share: the runtime, the queue and the metrics."""

    def __init__(self, runtime: Runtime, settings: ServerSettings, metrics: Metrics):
        self.runtime, self.settings, self.metrics = runtime, settings, metrics
        self.queue = WorkQueue(max_waiting=settings.max_queue)

    async def run_graph(self, request: Request, graph: dict, endpoint: str,
                        request_images: dict[str, bytes] | None = None) -> tuple[RunResult, Timings]:
        """Validate now (a bad graph gets its 400 without waiting in line), then run on the GPU
        worker; cancel if the client leaves or the time limit passes."""
        request_id = request.state.request_id
        context = self.runtime.context(request_id=request_id, request_images=request_images or {})
        validated = self.runtime.validate(graph, context)

        def work(cancel: threading.Event) -> RunResult:
            context.cancel = cancel
            return self.runtime.execute(validated, context)

        try:
            job = self.queue.submit(work, request_id)
        except QueueFull as full:
            raise ApiError(429, "queue_full", "the server is busy: too many requests waiting for the GPU",
                           {"queue_depth": self.queue.depth}, headers={"Retry-After": str(full.retry_after)})
        self.metrics.queue_depth.set(self.queue.depth)
        try:
            result = await self._wait(request, job)
        except Cancelled:
            raise ApiError(504, "timeout", f"generation did not finish within {self.settings.request_timeout_s:g}s")
        except ExecutionError as exc:
            if exc.user_error is not None:
                err = exc.user_error
                raise ApiError(err.status, err.type, err.message, err.details or None)
            if isinstance(exc.cause, Cancelled):
                raise ApiError(504, "timeout",
                               f"generation did not finish within {self.settings.request_timeout_s:g}s")
            raise
        finally:
            self.metrics.queue_depth.set(self.queue.depth)
        self.metrics.queue_wait_seconds.observe(job.wait_seconds)
        self.metrics.generation_seconds.labels(endpoint=endpoint).observe(job.run_seconds)
        return result, Timings(queue=job.wait_seconds, generation=job.run_seconds)

    async def _wait(self, request: Request, job):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.queue.abandon(job)
                raise Cancelled()
            done, _ = await asyncio.wait({job.future}, timeout=min(0.2, remaining))
            if done:
                try:
                    return job.future.result()
                except asyncio.CancelledError:
                    raise Cancelled()
            if await request.is_disconnected():
                self.queue.abandon(job)
                log.info("[%s] client disconnected; generation cancelled", job.request_id)
                raise ApiError(499, "client_closed_request", "the client closed the connection")


def get_service(request: Request) -> Service:
    """FastAPI dependency: the app's one Service (set by create_app)."""
    return request.app.state.service
