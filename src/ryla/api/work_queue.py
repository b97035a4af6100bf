"""The GPU work queue: one generation at a time, a bounded line in priority order, cancellation.

The engine runs on one worker thread, so the event loop keeps answering /health, /metrics
and queue-full 429s while a generation runs. A job whose client has gone away, or whose
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


@dataclass
class Job:
    fn: Callable[[threading.Event], Any]
    context: contextvars.Context
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    request_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    priority: float = 0.0  # lower runs first (ComfyUI's queue number); ties in arrival order
    state: str = "waiting"  # waiting -> running -> done, or waiting -> removed
    on_start: Callable[[], None] | None = None  # called on the worker thread as the job starts
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
    def __init__(self, max_waiting: int = 8):
        self.max_waiting = max_waiting
        self._queue: queue.PriorityQueue[tuple[float, int, Job | None]] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._waiting = 0
        self._running: Job | None = None
        self._lock = threading.Lock()
        self._recent_seconds: list[float] = []
        self._thread = threading.Thread(target=self._work, name="ryla-gpu-worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one running."""
        with self._lock:
            return self._waiting + (1 if self._running is not None else 0)

    def submit(self, fn: Callable[[threading.Event], Any], request_id: str = "-", priority: float = 0.0,
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
        """Seconds a client should wait: the line's length times a typical recent job."""
        typical = sorted(self._recent_seconds)[len(self._recent_seconds) // 2] if self._recent_seconds else 5.0
        return max(1, round(typical * (self._waiting + 1)))

    def close(self, timeout: float = 30.0) -> None:
        """Stop after cancelling the running job; waiting jobs are cancelled unstarted."""
        with self._lock:
            if self._running is not None:
                self._running.cancel.set()
        self._queue.put((math.inf, next(self._arrivals), None))
        self._thread.join(timeout)

    def _work(self) -> None:
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
                self._running = job
            job.started_at = time.perf_counter()
            if job.on_start is not None:
                job.on_start()
            try:
                result = job.context.run(job.fn, job.cancel)
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
            self._running = None
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
