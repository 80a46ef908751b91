"""HTTP routes of render jobs, added to `streamgen serve`'s app (same auth middleware, same JSON errors).

    POST   /jobs                 JSON spec (+ optional client "id", "webhook" URL under the server's --webhook-allow
                                 prefixes: told of state changes) → 202 {id, state, links}; 200 when that id
                                 already holds this spec; 409 another spec; 422 {error, field}; 429 {error, limit}
    GET    /jobs?state=&limit=   newest first
    GET    /jobs/{id}            state, frames done/total, frames/s, ETA, error
    GET    /jobs/{id}/events     Server-Sent Events (state, progress ≤ every 500 ms, prompt, checkpoint, resumed);
                                 replays after `Last-Event-ID`; ends after the terminal state
    GET    /jobs/{id}/output     the MP4 (Range requests supported)
    DELETE /jobs/{id}            cancel (at the next chunk; nothing half-written is left)

Store calls run in a thread: the event loop never waits on SQLite.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .runner import output_path
from .scheduler import JobScheduler, QueueFull
from .spec import SpecError, parse_spec
from .store import STATES, TERMINAL, Conflict, Job

SCHEDULER = web.AppKey("jobs", JobScheduler)
CLOSING = web.AppKey("jobs_closing", asyncio.Event)  # set on server shutdown: open event streams end
MAX_LIMIT = 1000
POLL_S = 0.25  # how often an open event stream looks for new events


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def links(job_id: str) -> dict[str, str]:
    base = f"/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "output": f"{base}/output", "cancel": base}


def describe(job: Job) -> dict[str, Any]:
    return {"id": job.id, "state": job.state, "priority": job.spec.priority, "frames_done": job.frames_done,
            "frames_total": job.frames_total, "progress": job.frames_done / job.frames_total if job.frames_total else 0.0,
            "frames_per_s": job.frames_per_s, "eta_s": job.eta_s, "error": job.error, "cancel_requested": job.cancel_requested,
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "spec": json.loads(job.spec.canonical()), "links": links(job.id)}


async def post_job(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "body must be JSON")
    scheduler = request.app[SCHEDULER]
    try:
        job_id, spec = parse_spec(body)
        job, created = await asyncio.to_thread(scheduler.submit, spec, job_id)
    except SpecError as exc:
        return _error(422, str(exc), field=exc.field)
    except Conflict as exc:
        return _error(409, str(exc))
    except QueueFull as exc:
        return web.json_response({"error": str(exc), "limit": exc.limit}, status=429, headers={"Retry-After": "10"})
    return web.json_response({"id": job.id, "state": job.state, "links": links(job.id)}, status=202 if created else 200,
                             headers={"Location": f"/jobs/{job.id}"})


async def list_jobs(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        return _error(422, f"unknown state {state!r}; known: {', '.join(STATES)}", field="state")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return _error(422, f"limit must be a whole number, got {request.query['limit']!r}", field="limit")
    if not 1 <= limit <= MAX_LIMIT:
        return _error(422, f"limit must be 1…{MAX_LIMIT}, got {limit}", field="limit")
    jobs = await asyncio.to_thread(request.app[SCHEDULER].store.list, state, limit)
    return web.json_response({"jobs": [describe(j) for j in jobs]})


async def _job(request: web.Request) -> Job | web.Response:
    job_id = request.match_info["id"]
    job = await asyncio.to_thread(request.app[SCHEDULER].store.get, job_id)
    return job if job is not None else _error(404, f"no job {job_id!r}")


async def get_job(request: web.Request) -> web.Response:
    job = await _job(request)
    return job if isinstance(job, web.Response) else web.json_response(describe(job))


async def delete_job(request: web.Request) -> web.Response:
    try:
        job = await asyncio.to_thread(request.app[SCHEDULER].cancel, request.match_info["id"])
    except KeyError:
        return _error(404, f"no job {request.match_info['id']!r}")
    except Conflict as exc:
        return _error(409, str(exc))
    return web.json_response(describe(job), status=202)


async def get_output(request: web.Request) -> web.StreamResponse:
    job = await _job(request)
    if isinstance(job, web.Response):
        return job
    if job.state != "succeeded":
        return _error(409, f"job {job.id!r} is {job.state}: its output exists once it succeeded")
    return web.FileResponse(output_path(request.app[SCHEDULER].store, job.id),
                            headers={"Content-Type": "video/mp4",
                                     "Content-Disposition": f'attachment; filename="{job.id}.mp4"'})


async def job_events(request: web.Request) -> web.StreamResponse:
    """SSE: every logged event after `Last-Event-ID` (header, or `?after=`), then new ones as they come."""
    job = await _job(request)
    if isinstance(job, web.Response):
        return job
    try:
        after = int(request.headers.get("Last-Event-ID") or request.query.get("after", "0"))
    except ValueError:
        return _error(422, "Last-Event-ID must be an event id (a whole number)", field="Last-Event-ID")
    store = request.app[SCHEDULER].store
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    while True:
        events = await asyncio.to_thread(store.events, job.id, after)
        for e in events:
            data = json.dumps({**e.data, "time": e.time}, separators=(",", ":"))
            await response.write(f"id: {e.id}\nevent: {e.kind}\ndata: {data}\n\n".encode())
            after = e.id
            if e.kind == "state" and e.data.get("state") in TERMINAL:
                await response.write_eof()
                return response
        if not events:
            current = await asyncio.to_thread(store.get, job.id)
            if current is None or (current.state in TERMINAL and not await asyncio.to_thread(store.events, job.id, after)):
                await response.write_eof()  # replayed from past the terminal event: nothing more will come
                return response
            try:
                await asyncio.wait_for(request.app[CLOSING].wait(), POLL_S)
            except asyncio.TimeoutError:
                continue
            await response.write_eof()
            return response


def add_job_routes(app: web.Application, scheduler: JobScheduler) -> None:
    app[SCHEDULER] = scheduler
    app[CLOSING] = closing = asyncio.Event()

    async def on_shutdown(_: web.Application) -> None:
        closing.set()

    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/jobs", post_job)
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get("/jobs/{id}", get_job)
    app.router.add_delete("/jobs/{id}", delete_job)
    app.router.add_get("/jobs/{id}/events", job_events)
    app.router.add_get("/jobs/{id}/output", get_output)
