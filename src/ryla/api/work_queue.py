"""The GPU work queue: one generation at a time per worker, a bounded line in priority order,
cancellation.

Each engine runs on its own worker thread (one per GPU with `--parallel replicas`, else one),
so the event loop keeps answering /health, /metrics and queue-full 429s while generations
run; a job goes to whichever worker is free first, and its function is told which. A job whose client has gone away, or whose
time limit passed, is cancelled: skipped if still waiting, stopped at the next sampling step
if running.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__("the generation queue is full")


@dataclass(eq=False)  # compared and hashed by identity (the running set)
class Job:
    fn: Callable[[threading.Event, int], Any]  # (cancel, worker index)
    context: contextvars.Context
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    request_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    priority: float = 0.0  # lower runs first (ComfyUI's queue number); ties in arrival order
    state: str = "waiting"  # waiting -> running -> done, or waiting -> removed
    on_start: Callable[[], None] | None = None  # called on the worker thread as the job starts
    worker: int | None = None  # the worker that runs it
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def wait_seconds(self) -> float:
        return (self.started_at or time.perf_counter()) - self.enqueued_at

    @property
    def run_seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.perf_counter()) - self.started_at


class WorkQueue:
    def __init__(self, max_waiting: int = 8, workers: int = 1):
        self.max_waiting = max_waiting
        self._queue: queue.PriorityQueue[tuple[float, int, Job | None]] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._waiting = 0
        self._running: set[Job] = set()
        self._lock = threading.Lock()
        self._recent_seconds: list[float] = []
        self.workers = workers
        self._threads = [threading.Thread(target=self._work, args=(index,), name=f"ryla-gpu-worker-{index}",
                                          daemon=True) for index in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        with self._lock:
            return self._waiting + len(self._running)

    def submit(self, fn: Callable[[threading.Event, int], Any], request_id: str = "-", priority: float = 0.0,
               on_start: Callable[[], None] | None = None) -> Job:
        loop = asyncio.get_running_loop()
        # The caller's context travels with the job, so logs from the worker keep the request id.
        job = Job(fn, contextvars.copy_context(), loop.create_future(), loop, request_id, priority=priority,
                  on_start=on_start)
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise QueueFull(self._retry_after_locked())
            self._waiting += 1
        self._queue.put((priority, next(self._arrivals), job))
        return job

    def remove(self, job: Job) -> bool:
        """Take a job out of the line before it starts (ComfyUI's queue delete). False when it
        has started already."""
        with self._lock:
            if job.state != "waiting":
                return False
            job.state = "removed"
            self._waiting -= 1
        job.cancel.set()
        self._resolve(job, exception=asyncio.CancelledError())
        return True

    def expected_wait(self) -> int:
        """Seconds until a job submitted now would start: the line's length times a typical
        recent job (for Retry-After)."""
        with self._lock:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        """Seconds a client should wait: the line's length times a typical recent job, shared
        among the workers."""
        typical = sorted(self._recent_seconds)[len(self._recent_seconds) // 2] if self._recent_seconds else 5.0
        return max(1, round(typical * (self._waiting + 1) / self.workers))

    def close(self, timeout: float = 30.0) -> None:
        """Stop after cancelling the running job; waiting jobs are cancelled unstarted."""
        with self._lock:
            for job in self._running:
                job.cancel.set()
        for _ in self._threads:
            self._queue.put((math.inf, next(self._arrivals), None))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self, worker: int) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                self._drain()
                return
            with self._lock:
                if job.state == "removed":
                    continue
                self._waiting -= 1
                if job.cancel.is_set():
                    job.state = "done"
                    log.info("[%s] cancelled before it started", job.request_id)
                    self._resolve(job, exception=asyncio.CancelledError())
                    continue
                job.state = "running"
                job.worker = worker
                self._running.add(job)
            job.started_at = time.perf_counter()
            if job.on_start is not None:
                job.on_start()
            try:
                result = job.context.run(job.fn, job.cancel, worker)
            except BaseException as exc:  # handed to the request's coroutine, which decides
                job.finished_at = time.perf_counter()
                self._finish(job, exception=exc)
            else:
                job.finished_at = time.perf_counter()
                self._finish(job, result=result)

    def _drain(self) -> None:
        while True:
            try:
                _, _, job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.state == "waiting":
                job.state = "done"
                self._resolve(job, exception=asyncio.CancelledError())

    def _finish(self, job: Job, result: Any = None, exception: BaseException | None = None) -> None:
        with self._lock:
            self._running.discard(job)
            job.state = "done"
            if exception is None:
                self._recent_seconds = (self._recent_seconds + [job.run_seconds])[-20:]
        self._resolve(job, result, exception)

    @staticmethod
    def _resolve(job: Job, result: Any = None, exception: BaseException | None = None) -> None:
        def settle():
            if job.future.done():
                return
            if exception is not None:
                job.future.set_exception(exception)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed (server shutting down)
            pass
