"""WHIP ingest (RFC 9725, draft-ietf-wish-whip; spec B6) for live video-to-video: a client sends its camera
with one HTTP POST of its SDP offer and gets the generated video back on the same connection.

`POST /whip?prompt=…&strength=…&seed=…` (`Content-Type: application/sdp`; an offer whose one video
section is `sendrecv`: the camera in, the generated video out; an audio section is allowed and answered
`inactive`; a data channel is not needed) → `201 Created`, `Content-Type: application/sdp`, the answer,
`Location: /whip/{session}`; `DELETE` on that location ends the session (`200`). `strength` (0, 1] is the
noise level the camera frames are taken to before denoising (default 0.75; 1 ignores them); the other
query parameters are the session's params, as for WHEP (`seed=3`, `steps=[1000,500]`). The server
gathers all its ICE candidates before answering (aiortc does not trickle): `PATCH` (trickle, ICE
restart) is `405`. `OPTIONS /whip` answers `204` with `Accept-Post: application/sdp`.
Errors are the API's JSON one-liners: 415 wrong content type, 400 malformed SDP or an offer that cannot
carry video input (named), 422 bad params or strength, 400 a model that takes no video input,
404 unknown resource, 429 offer rate, 503 full (with Retry-After).
"""
from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from .appstate import MANAGER, METRICS, error
from .errors import describe
from .ice import check_offer
from .ingest import video_problem
from .protocol import Offer
from .whep import SDP, query_params, answer_offer, sdp_offer



async def post_whip(request: web.Request) -> web.Response:
    response = await _post_whip(request)
    request.app[METRICS].inc("streamgen_whip_offers_total", code=str(response.status))
    return response


async def _post_whip(request: web.Request) -> web.Response:
    sdp = await sdp_offer(request, "WHIP")
    if isinstance(sdp, web.Response):
        return sdp
    if (reason := check_offer(sdp, control=False) or video_problem(sdp)) is not None:
        return error(400, reason)
    query = dict(request.query)
    prompt = query.pop("prompt", None)
    params = query_params(query)
    video = {"strength": params.pop("strength")} if "strength" in params else {}
    try:
        offer = Offer.model_validate({"sdp": sdp, "type": "offer", "prompt": prompt, "params": params or None,
                                      "video": video})
    except ValidationError as exc:
        return error(422, describe(exc, Offer))
    return await answer_offer(request, offer, "whip_session")


async def options_whip(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Accept-Post": SDP, "Allow": "POST, OPTIONS"})


async def delete_whip(request: web.Request) -> web.Response:
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None or session.video is None:
        return error(404, f"no WHIP session {request.match_info['sid']!r}")
    await session.close("deleted")
    return web.Response(status=200)


async def patch_whip(request: web.Request) -> web.Response:
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None or session.video is None:
        return error(404, f"no WHIP session {request.match_info['sid']!r}")
    return error(405, "this server answers with every ICE candidate gathered: no trickle ICE and no ICE restart "
                      "(send a new offer to POST /whip instead)", Allow="DELETE")


def add_whip_routes(app: web.Application) -> None:
    app.router.add_post("/whip", post_whip)
    app.router.add_route("OPTIONS", "/whip", options_whip)
    resource = app.router.add_resource("/whip/{sid}", name="whip_session")
    resource.add_route("DELETE", delete_whip)
    resource.add_route("PATCH", patch_whip)
