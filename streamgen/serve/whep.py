"""WHEP playback (draft-ietf-wish-whep-03; the WHIP rules of RFC 9725 it builds on): a standard player
watches a new session with one HTTP POST of its SDP offer.

`POST /whep?prompt=…&seed=…` (`Content-Type: application/sdp`, a recvonly video offer; a data channel is
not needed) → `201 Created`, `Content-Type: application/sdp`, the answer, `Location: /whep/{session}`;
`DELETE` on that location ends the session. The server gathers all its ICE candidates before answering
(aiortc does not trickle), so `PATCH` (trickle / ICE restart) is answered `405`. `HEAD /whep` answers
`200` with the SDP content type (endpoint discovery). Query parameters other than `prompt` are the
session's params (`StreamParams`), each value JSON (`seed=3`, `steps=[1000,500]`) or plain text.
Errors are the API's JSON one-liners: 415 wrong content type, 400 malformed SDP, 422 bad params,
404 unknown resource, 503 full (with Retry-After).
"""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from .appstate import MANAGER, METRICS, error, open_session
from .errors import describe
from .ice import check_offer
from .protocol import Offer

SDP = "application/sdp"


def query_params(query: dict[str, str]) -> dict[str, Any]:
    """Query values as the JSON they spell (numbers, lists), else as text."""
    out: dict[str, Any] = {}
    for key, value in query.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


async def post_whep(request: web.Request) -> web.Response:
    response = await _post_whep(request)
    request.app[METRICS].inc("streamgen_whep_offers_total", code=str(response.status))
    return response


async def sdp_offer(request: web.Request, protocol: str) -> str | web.Response:
    """The SDP offer a WHEP or WHIP client POSTs, or the refusal to send (415 wrong type, 400 not UTF-8)."""
    if request.content_type != SDP:
        return error(415, f"a {protocol} offer is sent as Content-Type: {SDP}, not {request.content_type or 'none'}",
                     **{"Accept-Post": SDP})
    try:
        return (await request.read()).decode("utf-8")
    except UnicodeDecodeError:
        return error(400, "malformed SDP: the body is not UTF-8 text")


async def answer_offer(request: web.Request, offer: Offer, route: str) -> web.Response:
    """Open the session and answer 201 with the SDP and its `Location` (the named `route`), or the refusal."""
    opened = await open_session(request, offer)
    if isinstance(opened, web.Response):
        return opened
    session, answer = opened
    location = str(request.app.router[route].url_for(sid=session.id))
    return web.Response(status=201, text=answer.sdp, content_type=SDP, headers={"Location": location})


async def _post_whep(request: web.Request) -> web.Response:
    sdp = await sdp_offer(request, "WHEP")
    if isinstance(sdp, web.Response):
        return sdp
    if (reason := check_offer(sdp, control=False)) is not None:
        return error(400, reason)
    query = dict(request.query)
    prompt = query.pop("prompt", None)
    try:
        offer = Offer.model_validate({"sdp": sdp, "type": "offer", "prompt": prompt,
                                      "params": query_params(query) or None})
    except ValidationError as exc:
        return error(422, describe(exc, Offer))
    return await answer_offer(request, offer, "whep_session")


async def head_whep(request: web.Request) -> web.Response:
    return web.Response(status=200, content_type=SDP)


async def delete_whep(request: web.Request) -> web.Response:
    session = request.app[MANAGER].get(request.match_info["sid"])
    if session is None:
        return error(404, f"no WHEP session {request.match_info['sid']!r}")
    await session.close("deleted")
    return web.Response(status=200)


async def patch_whep(request: web.Request) -> web.Response:
    if request.app[MANAGER].get(request.match_info["sid"]) is None:
        return error(404, f"no WHEP session {request.match_info['sid']!r}")
    return error(405, "this server answers with every ICE candidate gathered: no trickle ICE and no ICE restart "
                      "(send a new offer to POST /whep instead)", Allow="DELETE")


def add_whep_routes(app: web.Application) -> None:
    app.router.add_post("/whep", post_whep)
    app.router.add_route("HEAD", "/whep", head_whep)
    resource = app.router.add_resource("/whep/{sid}", name="whep_session")
    resource.add_route("DELETE", delete_whep)
    resource.add_route("PATCH", patch_whep)
