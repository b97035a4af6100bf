"""Asynchronous jobs: `Prefer: respond-async` on an image route answers 202 with the job's links
(RFC 7240's preference; the 202 carries `Preference-Applied` and a `Location`), `GET
/jobs/{id}` reports it, `GET /jobs/{id}/events` streams its progress as server-sent events,
and `DELETE /jobs/{id}` cancels it. A job id is a ComfyUI prompt_id: the same job is in
`/history` and on `/ws`."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ryla.api import jobs as job_states
from ryla.api.errors import ApiError
from ryla.api.jobs import Job
from ryla.api.service import Service, get_service

router = APIRouter(tags=["jobs"])

HEARTBEAT_S = 15.0


def wants_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(part.strip().lower() == "respond-async" for part in prefer.replace(";", ",").split(","))


def accepted(job: Job) -> JSONResponse:
    """202 for a job submitted with Prefer: respond-async."""
    body = {"job_id": job.id, "status": job.status, "status_url": f"{job.base_url}/jobs/{job.id}",
            "events_url": f"{job.base_url}/jobs/{job.id}/events"}
    return JSONResponse(body, status_code=202, headers={"Location": body["status_url"],
                                                        "Preference-Applied": "respond-async"})


def _job(service: Service, job_id: str) -> Job:
    job = service.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "job_not_found", f"no job {job_id!r} (finished jobs are kept up to the history's limit, "
                                             "and not across restarts)")
    return job


@router.get("/jobs/{job_id}", summary="A job's status, timings, progress and result")
async def get_job(job_id: str, service: Service = Depends(get_service)) -> dict:
    return _job(service, job_id).public()


@router.delete("/jobs/{job_id}", summary="Cancel a job: unqueued if waiting, stopped at the next step if running")
async def delete_job(job_id: str, service: Service = Depends(get_service)) -> dict:
    job = _job(service, job_id)
    if job.done:
        raise ApiError(409, "job_finished", f"job {job_id} has already finished ({job.status})")
    service.cancel(job, reason="DELETE /jobs", interrupted=True)
    await asyncio.wait_for(job.finished.wait(), timeout=service.settings.request_timeout_s)
    return job.public()


@router.get("/jobs/{job_id}/events", summary="Server-sent events: queued, started, progress, done / error",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events `queued`, `started`, `executing`, `progress` "
                                            "({value, max, node}), then one of `done`, `error`, `cancelled`; "
                                            "each event's data is JSON"}})
async def job_events(job_id: str, request: Request, service: Service = Depends(get_service)) -> StreamingResponse:
    job = _job(service, job_id)
    listener: asyncio.Queue = asyncio.Queue(job_states.SUBSCRIBER_BACKLOG)
    job.listeners.add(listener)

    def event(name: str, data) -> str:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n"

    def final() -> str:
        name = {job_states.SUCCESS: "done", job_states.ERROR: "error"}.get(job.status, "cancelled")
        return event(name, job.public())

    async def stream():
        try:
            # Where the job is now, so a late subscriber misses nothing that matters.
            if job.done:
                yield final()
                return
            yield event("queued", job.public())
            if job.status == job_states.RUNNING:
                yield event("started", job.public())
                if job.progress:
                    yield event("progress", job.progress)
            while True:
                try:
                    item = await asyncio.wait_for(listener.get(), timeout=HEARTBEAT_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield ": keep-alive\n\n"
                    continue
                if item is None:  # the job finished
                    yield final()
                    return
                name, data = item
                if name == "execution_start":
                    yield event("started", job.public())
                elif name == "executing" and data.get("node") is not None:
                    yield event("executing", {"node": data["node"],
                                              "class_type": job.node_types.get(data["node"])})
                elif name == "progress":
                    yield event("progress", {"value": data["value"], "max": data["max"], "node": data["node"]})
        finally:
            job.listeners.discard(listener)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
