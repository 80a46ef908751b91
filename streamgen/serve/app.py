"""HTTP routes: signaling (`POST /offer`, WHEP in `whep.py`, WHIP in `whip.py`), sessions, an avatar session's audio
WebSocket (`audio_push.py`), the model, health, metrics, ICE servers, the web client.

Every failure is a JSON `{"error": "<one line>"}` with a fitting status; nothing a client sends can
take the server down (unexpected exceptions become a 500 for that request only).
"""
from __future__ import annotations

import logging
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ..backends import Backend
from ..engine.prompts import describe_prompt, prompt_vocabulary
from ..errors import InputError
from ..images import DEFAULT_REFERENCE
from .appstate import (
    BACKEND,
    CONFIG,
    MANAGER,
    MAX_AVATAR_OFFER_BYTES,
    MAX_BODY_BYTES,
    METRICS,
    OFFER_LIMITER,
    error,
    open_session,
)
from .audio_push import add_audio_routes
from .avatar import audio_problem
from .config import ServeConfig
from .errors import describe
from .ice import check_offer, ice_servers
from .limits import AddressRateLimiter, Handler, bearer_auth, cors, origin_check
from .manager import SessionManager
from .metrics import Metrics
from .protocol import Offer, PublishRequest, RecordingRequest, load_json
from .publish import PublishPolicy, PublishRefused
from .whep import add_whep_routes
from .whip import add_whip_routes

log = logging.getLogger(__name__)



@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routing errors as JSON one-liners; any bug costs one 500, never the server."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reasons = {404: f"no such endpoint: {request.method} {request.path}",
                   405: f"method {request.method} not allowed on {request.path}",
                   413: f"request body too large (limit {MAX_BODY_BYTES} bytes)"}
        return error(exc.status, reasons.get(exc.status, exc.reason or "bad request"))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error(500, "internal server error (logged); the server keeps running")


async def post_offer(request: web.Request) -> web.Response:
    response = await _offer(request)
    request.app[METRICS].inc("streamgen_offers_total", code=str(response.status))
    return response


async def _offer(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        return error(415, f"POST /offer takes Content-Type: application/json, not {request.content_type or 'none'}")
    limit = MAX_AVATAR_OFFER_BYTES if request.app[BACKEND].bundle.avatar is not None else MAX_BODY_BYTES
    try:
        body = load_json(await request.clone(client_max_size=limit).read(), "body", limit)
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"request body too large (limit {limit} bytes)")
    except InputError as exc:
        return error(400, str(exc))
    if not isinstance(body, dict):
        return error(400, "body must be a JSON object with 'sdp' and 'type'")
    try:
        offer = Offer.model_validate(body)
    except ValidationError as exc:
        return error(422, describe(exc, Offer))
    if (reason := check_offer(offer.sdp) or audio_problem(request.app[BACKEND].bundle, offer.sdp)) is not None:
        return error(400, reason)
    opened = await open_session(request, offer)
    if isinstance(opened, web.Response):
        return opened
    session, answer = opened
    return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id,
                              "resume_token": session.resume_token})


async def get_session(request: web.Request) -> web.Response:
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None:
        return error(404, f"no session {request.match_info['sid']!r}")
    view = session.describe()
    encoder = request.app[BACKEND].bundle.text_encoder
    return web.json_response({**view, "prompt_detail": describe_prompt(encoder, view["prompt"]) or None})


M = TypeVar("M", bound=BaseModel)


async def _body(request: web.Request, model: type[M]) -> M | web.Response:
    """A session route's small JSON body as `model`, or the 400 (not JSON) / 422 (wrong fields) to answer."""
    try:
        return model.model_validate(load_json(await request.read(), "body", MAX_BODY_BYTES))
    except InputError as exc:
        return error(400, str(exc))
    except ValidationError as exc:
        return error(422, describe(exc, model))


async def post_recording(request: web.Request) -> web.Response:
    """Start or stop recording what the session's viewer is sent (see `recording.py`)."""
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None:
        return error(404, f"no session {request.match_info['sid']!r}")
    folder = request.app[CONFIG].recordings_dir
    if folder is None:
        return error(409, "recording is off on this server: start it with --recordings-dir DIR")
    body = await _body(request, RecordingRequest)
    if isinstance(body, web.Response):
        return body
    if body.action == "start":
        try:
            recording = session.start_recording(folder)
        except InputError as exc:
            return error(409, str(exc))
    elif (recording := session.stop_recording()) is None:
        return error(409, f"session {session.id} is not recording")
    return web.json_response({**recording.describe(), "url": f"/sessions/{session.id}/recording"})


async def post_publish(request: web.Request) -> web.Response:
    """Start or stop pushing what the session's viewer is sent to an allowed RTMP URL (see `publish.py`)."""
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None:
        return error(404, f"no session {request.match_info['sid']!r}")
    body = await _body(request, PublishRequest)
    if isinstance(body, web.Response):
        return body
    if body.action == "stop":
        if (publication := session.stop_publishing()) is None:
            return error(409, f"session {session.id} is not publishing")
        return web.json_response(publication.describe())
    try:
        url = PublishPolicy(request.app[CONFIG].publish_allow).check(body.url)
    except PublishRefused as exc:
        return error(403, str(exc))
    except InputError as exc:
        return error(400, str(exc))
    try:
        publication = session.start_publishing(url)
    except InputError as exc:
        return error(409, str(exc))
    return web.json_response(publication.describe())


async def get_recording(request: web.Request) -> web.StreamResponse:
    """The session's latest recording as written so far (a playable file at every moment)."""
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None:
        return error(404, f"no session {request.match_info['sid']!r}")
    recording = session.recording
    if recording is None:
        return error(404, f"session {session.id} has no recording: POST {{\"action\": \"start\"}} to start one")
    if not recording.path.exists():
        return error(404, "the recording has no frames yet: it starts at the viewer's next keyframe")
    return web.FileResponse(recording.path, headers={"Content-Type": recording.content_type})


async def get_model(request: web.Request) -> web.Response:
    """What the page tells the user about the model: its name, rate and, for a closed-vocabulary model
    (the embedded one), the words it knows — every other word of a prompt is ignored."""
    bundle = request.app[BACKEND].bundle
    avatar = None if bundle.avatar is None else {"sample_rate": bundle.avatar.sample_rate,
                                                 "samples_per_frame": bundle.avatar.samples_per_frame,
                                                 "default_reference": f"default: {DEFAULT_REFERENCE}"}
    return web.json_response({"name": bundle.name, "description": bundle.description, "fps": bundle.fps,
                              "vocabulary": prompt_vocabulary(bundle.text_encoder), "avatar": avatar})


async def delete_session(request: web.Request) -> web.Response:
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None:
        return error(404, f"no session {request.match_info['sid']!r}")
    await session.close("deleted")
    return web.json_response({"session_id": session.id, "state": "closed"})


async def health(request: web.Request) -> web.Response:
    stats = request.app[BACKEND].stats()
    return web.json_response({"status": "ok", **stats, "sessions": request.app[MANAGER].counts()})


async def metrics(request: web.Request) -> web.Response:
    manager, backend = request.app[MANAGER], request.app[BACKEND]
    stats = backend.stats()
    gauges = {
        "streamgen_sessions": ("Sessions by state.", {(("state", k),): float(v) for k, v in manager.counts().items()}),
        "streamgen_backend_streams": ("Streams open in the backend.", {(): float(stats["streams"])}),
        "streamgen_backend_capacity": ("Streams the backend can hold.", {(): float(stats["capacity"])}),
        "streamgen_queue_depth_frames": ("Frames waiting to be sent, summed over sessions.",
                                         {(): float(sum(s.queue.depth for s in manager.sessions.values()))}),
    }
    return web.Response(text=request.app[METRICS].render(gauges), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def get_ice_servers(request: web.Request) -> web.Response:
    """What browsers should put in their RTCPeerConnection (the server's own STUN/TURN list)."""
    servers = [{k: v for k, v in (("urls", s.urls), ("username", s.username), ("credential", s.credential)) if v}
               for s in ice_servers(request.app[CONFIG].ice_servers)]
    return web.json_response({"iceServers": servers})


async def index(request: web.Request) -> web.StreamResponse:
    page = request.app[CONFIG].web_root / "index.html"
    if not page.is_file():
        return web.Response(status=404, content_type="text/plain",
                            text=f"No web client here: {page} does not exist yet. Use the Python client "
                                 "(streamgen client URL) or POST /offer directly.\n")
    return web.FileResponse(page)


async def static(request: web.Request) -> web.StreamResponse:
    root = request.app[CONFIG].web_root.resolve()
    try:
        path = (root / request.match_info["path"]).resolve()
        found = path.is_relative_to(root) and path.is_file()
    except (ValueError, OSError):  # a NUL byte, a name too long: no such file either way
        found = False
    if not found:
        return error(404, f"no static file {request.match_info['path']!r} under {root.name}/")
    return web.FileResponse(path)


def create_app(config: ServeConfig, backend: Backend, manager: SessionManager, metrics_: Metrics) -> web.Application:
    app = web.Application(middlewares=[json_errors, cors(config.allowed_origins), origin_check(config.allowed_origins),
                                       bearer_auth(config.token)],
                          client_max_size=MAX_BODY_BYTES)
    app[CONFIG], app[BACKEND], app[MANAGER], app[METRICS] = config, backend, manager, metrics_
    app[OFFER_LIMITER] = AddressRateLimiter(config.offer_rate, config.offer_burst)
    app.router.add_post("/offer", post_offer)
    app.router.add_get("/sessions/{sid}", get_session)
    app.router.add_delete("/sessions/{sid}", delete_session)
    app.router.add_post("/sessions/{sid}/recording", post_recording)
    app.router.add_get("/sessions/{sid}/recording", get_recording)
    app.router.add_post("/sessions/{sid}/publish", post_publish)
    app.router.add_get("/model", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ice-servers", get_ice_servers)
    add_whep_routes(app)
    add_whip_routes(app)
    add_audio_routes(app)
    app.router.add_get("/", index)
    app.router.add_get("/static/{path:.+}", static)
    return app

