"""Server settings and the service the routes share: every request becomes a job in one job
store (ryla.api.jobs) over one GPU work queue. A job is validated before it queues, runs on the
GPU worker, reports its progress to the job's listeners (websockets, event streams), keeps its
SaveImage outputs in the output folder, and, when asked, calls a webhook once it is done.

A synchronous request waits for its job's images (cancelling when the client leaves or the time
limit passes); an asynchronous one (`Prefer: respond-async`, `POST /prompt`) gets the job's id
at once."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from ryla.api import jobs as job_states
from ryla.api.auth import check_key
from ryla.api.errors import ApiError
from ryla.api.jobs import Job, JobStore, now_ms
from ryla.api.metrics import Metrics
from ryla.api.storage import DataFolders
from ryla.api.work_queue import QueueFull, WorkQueue
from ryla.flux.engine import Cancelled
from ryla.graph.executor import CostLimitError, ExecutionError, Limits, NodeUserError, is_ui_format
from ryla.runtime import RunResult, Runtime
from ryla.safety import Safety, SafetyUnavailable, check_mode, stricter

log = logging.getLogger(__name__)

MB = 1024 * 1024
# How long a finished job keeps its in-memory result (the PIL images a waiting request encodes,
# or the exception with its traceback): the history keeps a thousand jobs, and their images
# (3 MB each at 1024x1024) must not stay in memory with them.
RESULT_KEEP_S = 60.0


def default_data_dir() -> Path:
    return Path(os.environ.get("RYLA_DATA_DIR") or Path.home() / ".cache" / "ryla" / "data")


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_queue: int = 8  # requests waiting for the GPU beyond the one running
    request_timeout_s: float = 300.0
    max_body_bytes: int = 32 * MB
    max_lora_bytes: int = 2048 * MB  # a rank-128 FLUX LoRA is ~1.3 GB
    max_image_bytes: int = 10 * MB  # an encoded reference / pose / workflow photo
    max_image_pixels: int = 40_000_000  # one decoded image
    # What one graph may cost (ryla.graph.executor.Limits); refused with 422 before it queues.
    max_pixels: int = 4096 * 4096
    max_steps: int = 1_000
    max_schedule: int = 10_000
    max_nodes: int = 10_000
    preload: bool = True
    data_dir: Path | None = None  # input/, output/, temp/ [default: $RYLA_DATA_DIR or ~/.cache/ryla/data]
    max_output_bytes: int = 10 * 1024 * MB
    max_output_age_s: float = 7 * 86400.0
    max_history: int = job_states.MAX_HISTORY
    allow_private_webhooks: bool = False
    # Host names the server answers to (DNS-rebinding guard; `ryla serve` sets the loopback
    # names when it binds to loopback); None answers any.
    allowed_hosts: frozenset[str] | None = None
    safety: str = "off"  # off | flag | block (ryla.safety)
    safety_checker: str = "nudenet"

    @classmethod
    def from_env(cls, **overrides) -> ServerSettings:
        values: dict[str, Any] = {"api_key": os.environ.get("RYLA_API_KEY") or None}
        for name, env, cast in (("max_queue", "RYLA_MAX_QUEUE", int),
                                ("request_timeout_s", "RYLA_REQUEST_TIMEOUT", float),
                                ("max_body_bytes", "RYLA_MAX_BODY_BYTES", int),
                                ("max_lora_bytes", "RYLA_MAX_LORA_BYTES", int),
                                ("max_output_bytes", "RYLA_MAX_OUTPUT_BYTES", int),
                                ("max_image_pixels", "RYLA_MAX_IMAGE_PIXELS", int),
                                ("max_pixels", "RYLA_MAX_PIXELS", int),
                                ("max_steps", "RYLA_MAX_STEPS", int),
                                ("max_schedule", "RYLA_MAX_SCHEDULE", int),
                                ("max_nodes", "RYLA_MAX_NODES", int),
                                ("max_output_age_s", "RYLA_MAX_OUTPUT_AGE", float)):
            if os.environ.get(env):
                values[name] = cast(os.environ[env])
        for name, env in (("safety", "RYLA_SAFETY"), ("safety_checker", "RYLA_SAFETY_CHECKER")):
            if os.environ.get(env):
                values[name] = os.environ[env]
        if os.environ.get("RYLA_ALLOW_PRIVATE_WEBHOOKS", "").lower() in ("1", "true", "yes"):
            values["allow_private_webhooks"] = True
        values.update({k: v for k, v in overrides.items() if v is not None})
        check_key(values.get("api_key"))
        check_mode(values.get("safety", "off"))
        return cls(**values)


@dataclass
class Timings:
    queue: float = 0.0
    generation: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    job_id: str | None = None

    def as_dict(self) -> dict[str, float]:
        return {"queue_s": round(self.queue, 4), "generation_s": round(self.generation, 4),
                "total_s": round(self.queue + self.generation, 4), **self.extra}


def _timeout_error(settings: ServerSettings) -> ApiError:
    return ApiError(504, "timeout", f"generation did not finish within {settings.request_timeout_s:g}s")


class Service:
    """What the routes share: the runtime, the queue, the job store, the folders, the metrics."""

    def __init__(self, runtime: Runtime, settings: ServerSettings, metrics: Metrics):
        self.runtime, self.settings, self.metrics = runtime, settings, metrics
        # one worker per engine: `--parallel replicas` gives the runtime one engine per GPU
        self.queue = WorkQueue(max_waiting=settings.max_queue, workers=len(runtime.engines))
        self.jobs = JobStore(settings.max_history)
        self.folders = DataFolders(settings.data_dir or default_data_dir(), settings.max_output_bytes,
                                   settings.max_output_age_s)
        self._tasks: set[asyncio.Task] = set()
        self.safety = Safety(settings.safety, settings.safety_checker)
        self.limits = Limits(max_nodes=settings.max_nodes, max_pixels=settings.max_pixels,
                             max_steps=settings.max_steps, max_schedule=settings.max_schedule)

    # ------------------------------------------------------------------ submitting

    async def submit(self, request: Request, graph: dict, endpoint: str, *,
                     request_images: dict[str, bytes] | None = None, extra_data: dict | None = None,
                     number: float | None = None, front: bool = False, seeds: list | None = None,
                     webhook: str | None = None, safety: bool | None = None) -> Job:
        """Validate now (a bad graph gets its 400 without waiting in line), then queue the job."""
        request_id = request.state.request_id
        context = self.runtime.context(request_id=request_id, request_images=request_images or {},
                                       input_dir=self.folders.folder("input"), limits=self.limits)
        try:
            validated = self.runtime.validate(graph, context)
        except CostLimitError as exc:
            raise ApiError(422, "limit_exceeded", str(exc), {"limit": exc.limit, "value": exc.value,
                                                              "maximum": exc.maximum, "node_id": exc.node_id})
        if is_ui_format(graph):
            # The API graph runs and goes into history; the editor's file is kept for the PNGs'
            # "workflow" chunk, as ComfyUI's frontend sends it in extra_pnginfo.
            extra_data = dict(extra_data or {})
            extra_data.setdefault("extra_pnginfo", {"workflow": graph})
            graph = validated.prompt
        job = self.jobs.create(endpoint=endpoint, request_id=request_id, graph=graph, extra_data=extra_data,
                               outputs_to_execute=list(validated.outputs),
                               node_types={node_id: cls.class_type for node_id, (cls, _) in validated.nodes.items()},
                               number=number, front=front, seeds=seeds, webhook=webhook,
                               base_url=str(request.base_url).rstrip("/"))
        job.safety = stricter(self.safety.mode, safety)
        loop = asyncio.get_running_loop()

        def report(handler, *args):  # from the GPU worker to the event loop
            try:
                loop.call_soon_threadsafe(handler, job, *args)
            except RuntimeError:  # the loop is closed: the server is stopping
                pass

        def work(cancel: threading.Event, worker: int) -> RunResult:
            context.cancel = cancel
            context.engine = self.runtime.engines[worker]
            context.on_executing = lambda node_id: report(self._on_executing, node_id)
            context.on_progress = lambda node_id, value, total: report(self._on_progress, node_id, value, total)
            return self.runtime.execute(validated, context)

        try:
            job.handle = self.queue.submit(work, request_id, priority=job.number,
                                           on_start=lambda: report(self._on_start))
        except QueueFull as full:
            self.jobs.forget(job)
            raise ApiError(429, "queue_full", "the server is busy: too many requests waiting for the GPU",
                           {"queue_depth": self.queue.depth}, headers={"Retry-After": str(full.retry_after)})
        self.metrics.queue_depth.set(self.queue.depth)
        self.jobs.broadcast_status()
        task = asyncio.create_task(self._follow(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def wait_for_images(self, request: Request | None, job: Job) -> RunResult:
        """The job's images, once made; gives up (and cancels the job) at the time limit or when
        the client leaves."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                waited = job.status == job_states.PENDING
                self.cancel(job, reason="timeout")
                if waited:
                    raise ApiError(504, "timeout", f"the request waited {self.settings.request_timeout_s:g}s in the "
                                                   "queue for the GPU and never started; nothing was generated",
                                   {"queue_depth": self.queue.depth},
                                   headers={"Retry-After": str(self.queue.expected_wait())})
                raise _timeout_error(self.settings)
            if job.result is None:
                return self._result_or_error(job)
            done, _ = await asyncio.wait({job.result}, timeout=min(0.2, remaining))
            if done:
                return self._result_or_error(job)
            if request is not None and await request.is_disconnected():
                self.cancel(job, reason="client disconnected")
                log.info("[%s] client disconnected; generation cancelled", job.request_id)
                raise ApiError(499, "client_closed_request", "the client closed the connection")

    def _result_or_error(self, job: Job) -> RunResult:
        if job.result is None:  # released RESULT_KEEP_S after the job finished
            raise ApiError(410, "result_released", "the job finished long ago; its images are at GET /jobs/{id}")
        try:
            return job.result.result()
        except asyncio.CancelledError:
            if job.interrupted:
                raise ApiError(409, "interrupted", "the job was interrupted (POST /interrupt or DELETE /jobs/{id})")
            raise _timeout_error(self.settings)
        except ExecutionError as exc:
            if exc.user_error is not None:
                err = exc.user_error
                raise ApiError(err.status, err.type, err.message, err.details or None)
            raise

    # ------------------------------------------------------------------ cancelling

    def cancel(self, job: Job, reason: str = "cancelled", interrupted: bool = False) -> bool:
        """Stop a job: unqueue it if it waits, stop it at the next step or node if it runs."""
        if job.done or job.handle is None:
            return False
        job.interrupted = job.interrupted or interrupted
        if self.queue.remove(job.handle):
            log.info("[%s] removed from the queue (%s)", job.request_id, reason)
        else:  # running: the engine stops at its next step or node; _follow records the outcome
            job.handle.cancel.set()
        return True

    def delete_pending(self, job: Job) -> bool:
        """ComfyUI's queue delete: a waiting job leaves the queue and is forgotten."""
        if job.status != job_states.PENDING or job.handle is None or not self.queue.remove(job.handle):
            return False
        job.status = job_states.CANCELLED
        self.jobs.forget(job)
        return True

    # ------------------------------------------------------------------ reports from the worker

    def _on_start(self, job: Job) -> None:
        job.status = job_states.RUNNING
        job.started_at = time.time()
        job.queue_seconds = job.handle.wait_seconds
        data = {"prompt_id": job.id, "timestamp": now_ms()}
        job.messages.append(["execution_start", data])
        self.jobs.job_event(job, "execution_start", data)
        cached = {"nodes": [], "prompt_id": job.id, "timestamp": now_ms()}
        job.messages.append(["execution_cached", cached])
        self.jobs.job_event(job, "execution_cached", cached)

    def _on_executing(self, job: Job, node_id: str) -> None:
        job.current_node = node_id
        self.jobs.job_event(job, "executing", {"node": node_id, "display_node": node_id, "prompt_id": job.id})

    def _on_progress(self, job: Job, node_id: str, value: int, total: int) -> None:
        job.progress = {"value": value, "max": total, "node": node_id}
        self.jobs.job_event(job, "progress", {"value": value, "max": total, "prompt_id": job.id, "node": node_id})

    # ------------------------------------------------------------------ the end of a job

    async def _follow(self, job: Job) -> None:
        """Wait for the worker, hand the images to a waiting request at once, then keep the
        outputs on disk, write the history entry and tell every listener."""
        try:
            result = await job.handle.future
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
            job.run_seconds = job.handle.run_seconds
            self._failed(job, exc)
        else:
            job.run_seconds = job.handle.run_seconds
            if job.safety != "off":
                try:
                    await self._check_safety(job, result)
                except SafetyUnavailable as exc:
                    self._failed(job, ExecutionError("safety", "SafetyChecker", NodeUserError(
                        "safety_unavailable", f"the safety checker is not available: {exc}", status=503)))
                    return
            job.result.set_result(result)
            self.metrics.queue_wait_seconds.observe(job.queue_seconds)
            self.metrics.generation_seconds.labels(endpoint=job.endpoint).observe(job.run_seconds)
            try:
                outputs = await asyncio.to_thread(self._store_outputs, job, result)
            except Exception as exc:
                log.error("[%s] could not keep the outputs", job.request_id, exc_info=exc)
                outputs = {}
            for node_id, output in outputs.items():
                job.outputs[node_id] = output
                job.executed_nodes.append(node_id)
                self.jobs.job_event(job, "executed", {"node": node_id, "display_node": node_id, "output": output,
                                                      "prompt_id": job.id})
            job.images = [image for output in outputs.values() for image in output["images"]]
            job.status = job_states.SUCCESS
            data = {"prompt_id": job.id, "timestamp": now_ms()}
            job.messages.append(["execution_success", data])
            self._finished(job, "execution_success", data)
        finally:
            self.metrics.queue_depth.set(self.queue.depth)

    async def _check_safety(self, job: Job, result: RunResult) -> None:
        """The NSFW check (ryla.safety) on the decoded images, off the GPU worker, before anyone
        sees them: flagged images are blacked out in `block` mode, so neither the response nor
        the output folder holds them."""
        start = time.perf_counter()
        images, flags = await asyncio.to_thread(self.safety.apply, result.images, job.safety)
        result.images = images
        result.annotations["has_nsfw_concepts"] = flags
        result.annotations["nsfw_blocked"] = job.safety == "block" and any(flags)
        result.annotations["safety_mode"] = job.safety
        job.nsfw = flags
        seconds = time.perf_counter() - start
        log.info("[%s] safety %s: %s in %.3fs", job.request_id, job.safety, flags, seconds)

    def _failed(self, job: Job, exc: BaseException) -> None:
        cause = exc.cause if isinstance(exc, ExecutionError) else exc
        if isinstance(cause, (asyncio.CancelledError, Cancelled)):
            job.result.cancel()
        else:
            job.result.set_exception(exc)
            job.result.add_done_callback(lambda f: f.cancelled() or f.exception())
        base = {"prompt_id": job.id, "node_id": getattr(exc, "node_id", None),
                "node_type": getattr(exc, "class_type", None), "executed": job.executed_nodes}
        if isinstance(cause, (asyncio.CancelledError, Cancelled)):
            job.status = job_states.CANCELLED if job.started_at is None else job_states.INTERRUPTED
            job.error = {"type": "interrupted" if job.interrupted else "cancelled",
                         "message": "interrupted" if job.interrupted else "cancelled (time limit or client gone)"}
            data = {**base, "timestamp": now_ms()}
            job.messages.append(["execution_interrupted", data])
            self._finished(job, "execution_interrupted", data)
            return
        if isinstance(exc, ExecutionError) and exc.user_error is not None:
            err = exc.user_error
            job.error = {"type": err.type, "message": err.message, "status": err.status, "details": err.details or None}
        else:
            log.error("[%s] job failed", job.request_id, exc_info=exc)
            job.error = {"type": "internal_error", "status": 500,
                         "message": f"internal server error; the server log has the details under request id "
                                    f"{job.request_id}"}
        job.status = job_states.ERROR
        data = {**base, "exception_message": job.error["message"], "exception_type": job.error["type"],
                "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}
        job.messages.append(["execution_error", data])
        self._finished(job, "execution_error", data)

    def _release(self, job: Job) -> None:
        """Drop a finished job's in-memory result; its files and history entry stay."""
        job.result = None

    def _finished(self, job: Job, event: str, data: dict) -> None:
        asyncio.get_running_loop().call_later(RESULT_KEEP_S, self._release, job)
        job.finished_at = time.time()
        job.current_node = None
        self.jobs.job_event(job, event, data)
        self.jobs.job_event(job, "executing", {"node": None, "prompt_id": job.id})
        job.finished.set()
        for listener in list(job.listeners):
            job_states.offer(listener, None)  # the end of an event stream
        self.jobs.trim()
        self.jobs.broadcast_status()
        if job.webhook:
            from ryla.api.webhooks import deliver

            task = asyncio.create_task(deliver(job, self.settings))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _store_outputs(self, job: Job, result: RunResult) -> dict[str, dict]:
        """SaveImage's images into output/ (with the prompt and workflow in the PNG), PreviewImage's
        into temp/; the output folder is pruned to its limits afterwards."""
        outputs: dict[str, dict] = {}
        temp_prefix = None
        extra_pnginfo = job.extra_data.get("extra_pnginfo") if isinstance(job.extra_data.get("extra_pnginfo"),
                                                                          dict) else None
        for image, prefix, node_id in zip(result.images, result.prefixes, result.node_ids):
            if job.node_types.get(node_id) == "PreviewImage":
                temp_prefix = temp_prefix or self.folders.temp_prefix()
                stored = self.folders.save_png(image, "temp", temp_prefix, None, None)
            else:
                stored = self.folders.save_png(image, "output", prefix, job.graph, extra_pnginfo)
            outputs.setdefault(node_id, {"images": []})["images"].append(stored.as_dict())
        self.folders.prune_outputs()
        return outputs


def get_service(request: Request) -> Service:
    """FastAPI dependency: the app's one Service (set by create_app)."""
    return request.app.state.service
