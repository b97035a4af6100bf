"""One job store for every way a graph reaches the GPU: typed endpoints (sync or `Prefer:
respond-async`), ComfyUI's `POST /prompt` and OpenAI's image route. A job id is a ComfyUI
prompt_id, so the same job shows in `/history`, `/queue`, `/ws`, `/jobs/{id}` and its event
stream.

Shapes follow ComfyUI's execution.py (`PromptQueue`: queue items `[number, prompt_id, prompt,
extra_data, outputs_to_execute]`, history entries `{prompt, outputs, status: {status_str,
completed, messages}, meta}`) and server.py (websocket messages `{"type", "data"}`; a job's
events go to the socket of its client_id, or to every socket when it has none). The history is
bounded, like ComfyUI's; the server keeps it in memory and forgets it on restart.

Everything here runs on the event loop; the GPU worker reports through `Service`, which hops
onto the loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PENDING, RUNNING, SUCCESS, ERROR, INTERRUPTED, CANCELLED = (
    "pending", "running", "success", "error", "interrupted", "cancelled")
FINISHED = (SUCCESS, ERROR, INTERRUPTED, CANCELLED)
MAX_HISTORY = 1000
SUBSCRIBER_BACKLOG = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(eq=False)
class Job:
    id: str
    number: float
    endpoint: str
    request_id: str
    graph: dict
    extra_data: dict
    outputs_to_execute: list[str]
    node_types: dict[str, str]
    seeds: list[int | None] = field(default_factory=list)
    webhook: str | None = None
    safety: str = "off"  # the NSFW check this job gets (ryla.safety)
    nsfw: list[bool] | None = None  # its images' flags, when checked
    base_url: str = ""  # the server's URL as the client reached it, for links in events and webhooks
    status: str = PENDING
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    queue_seconds: float = 0.0
    run_seconds: float = 0.0
    outputs: dict[str, dict] = field(default_factory=dict)
    images: list[dict] = field(default_factory=list)
    messages: list[list] = field(default_factory=list)
    error: dict | None = None
    progress: dict | None = None
    current_node: str | None = None
    executed_nodes: list[str] = field(default_factory=list)
    handle: Any = None  # the WorkQueue's job
    interrupted: bool = False
    # Set when the images exist in memory (the sync response needs no files); set to an
    # exception when the run failed.
    result: asyncio.Future | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: set[asyncio.Queue] = field(default_factory=set)

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    def queue_item(self) -> list:
        return [self.number, self.id, self.graph, self.extra_data, self.outputs_to_execute]

    def history_entry(self) -> dict:
        status_str = "success" if self.status == SUCCESS else "error"
        return {
            "prompt": self.queue_item(),
            "outputs": self.outputs,
            "status": {"status_str": status_str, "completed": self.status == SUCCESS, "messages": self.messages},
            "meta": {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None,
                               "real_node_id": node_id} for node_id in self.outputs},
        }

    def public(self, base_url: str | None = None) -> dict:
        """GET /jobs/{id}."""
        base_url = self.base_url if base_url is None else base_url
        timings = {"queue_s": round(self.queue_seconds, 4), "generation_s": round(self.run_seconds, 4)}
        body: dict[str, Any] = {
            "job_id": self.id, "status": self.status, "endpoint": self.endpoint, "request_id": self.request_id,
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "timings": timings, "progress": self.progress, "error": self.error,
            "status_url": f"{base_url}/jobs/{self.id}", "events_url": f"{base_url}/jobs/{self.id}/events",
        }
        if self.status == SUCCESS:
            seeds = self.seeds if len(self.seeds) == len(self.images) else [None] * len(self.images)
            body["result"] = {"images": [{**image, "url": view_url(base_url, image), "seed": seed}
                                         for image, seed in zip(self.images, seeds)]}
            if self.nsfw is not None:
                body["result"]["has_nsfw_concepts"] = self.nsfw
                body["result"]["nsfw_blocked"] = self.safety == "block" and any(self.nsfw)
        return body


def view_url(base_url: str, image: dict) -> str:
    from urllib.parse import urlencode

    query = urlencode({"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
    return f"{base_url}/view?{query}"


class JobStore:
    """Jobs by id, oldest first; finished ones past MAX_HISTORY are forgotten. Websocket
    clients by their client id."""

    def __init__(self, max_history: int = MAX_HISTORY):
        self.max_history = max_history
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.sockets: dict[str, asyncio.Queue] = {}
        self._number = 0

    def create(self, *, endpoint: str, request_id: str, graph: dict, extra_data: dict | None,
               outputs_to_execute: list[str], node_types: dict[str, str], number: float | None = None,
               front: bool = False, seeds: list | None = None, webhook: str | None = None,
               base_url: str = "") -> Job:
        if number is None:
            number = -self._number if front else self._number
            self._number += 1
        job = Job(id=str(uuid.uuid4()), number=float(number) if isinstance(number, float) else number,
                  endpoint=endpoint, request_id=request_id, graph=graph, extra_data=dict(extra_data or {}),
                  outputs_to_execute=outputs_to_execute, node_types=node_types, seeds=list(seeds or []),
                  webhook=webhook, base_url=base_url, result=asyncio.get_running_loop().create_future())
        self.jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def forget(self, job: Job) -> None:
        self.jobs.pop(job.id, None)

    def trim(self) -> None:
        finished = [job for job in self.jobs.values() if job.done]
        for job in finished[: max(0, len(finished) - self.max_history)]:
            self.jobs.pop(job.id, None)

    # ------------------------------------------------------------------ ComfyUI's views

    def running(self) -> list[Job]:
        return [job for job in self.jobs.values() if job.status == RUNNING]

    def pending(self) -> list[Job]:
        return sorted((job for job in self.jobs.values() if job.status == PENDING), key=lambda j: j.number)

    def remaining(self) -> int:
        """Jobs not yet in the history: ComfyUI's queue_remaining."""
        return sum(1 for job in self.jobs.values() if not job.done)

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def history(self, max_items: int | None = None, offset: int = 0) -> dict:
        finished = [job for job in self.jobs.values() if job.done and job.status != CANCELLED]
        if max_items is not None:
            finished = finished[max(0, len(finished) - offset - max_items): len(finished) - offset or None]
        return {job.id: job.history_entry() for job in finished}

    # ------------------------------------------------------------------ events

    def connect(self, client_id: str) -> asyncio.Queue:
        """A websocket's message queue; a reconnect with the same id replaces the old one."""
        messages: asyncio.Queue = asyncio.Queue(SUBSCRIBER_BACKLOG)
        self.sockets[client_id] = messages
        return messages

    def disconnect(self, client_id: str, messages: asyncio.Queue) -> None:
        if self.sockets.get(client_id) is messages:
            del self.sockets[client_id]

    def send(self, event: str, data: dict, client_id: str | None = None) -> None:
        """To one websocket client, or to all when `client_id` is None (ComfyUI's rule)."""
        message = {"type": event, "data": data}
        targets = self.sockets.values() if client_id is None else [self.sockets.get(client_id)]
        for target in list(targets):
            if target is not None:
                offer(target, message)

    def broadcast_status(self) -> None:
        self.send("status", {"status": self.queue_info()})

    def job_event(self, job: Job, event: str, data: dict) -> None:
        """A ComfyUI execution event: to the job's websocket client, and to its event streams."""
        self.send(event, data, job.client_id)
        for listener in list(job.listeners):
            offer(listener, (event, data))


def offer(target: asyncio.Queue, message) -> None:
    try:
        target.put_nowait(message)
    except asyncio.QueueFull:  # a client that stopped reading loses messages, not the server
        pass
