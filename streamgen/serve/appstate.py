"""What every route module shares: the application's state keys, the one JSON error reply, and opening
a session from a checked offer (POST /offer and WHEP)."""
from __future__ import annotations

from aiohttp import web
from aiortc import RTCSessionDescription

from ..backends import Backend, CapacityError
from ..errors import InputError
from .config import ServeConfig
from .limits import AddressRateLimiter
from .manager import Refused, SessionManager
from .metrics import Metrics
from .protocol import Offer
from .session import Session

MAX_BODY_BYTES = 256 * 1024
MAX_AVATAR_OFFER_BYTES = 6 * 1024 * 1024  # an avatar model's offer carries its reference picture (≤ 4 MB, base64)
MANAGER = web.AppKey("manager", SessionManager)
CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", Metrics)
BACKEND = web.AppKey("backend", Backend)
OFFER_LIMITER = web.AppKey("offer_limiter", AddressRateLimiter)


def error(status: int, message: str, **headers: str) -> web.Response:
    """`{"error": "<one line>"}` with a fitting status: every failure of the HTTP API looks like this."""
    return web.json_response({"error": message}, status=status, headers=headers or None)


async def open_session(request: web.Request, offer: Offer) -> tuple[Session, RTCSessionDescription] | web.Response:
    """The session and answer for a validated offer, or the refusal to send: over the address's offer
    rate (429), at capacity (503), refused by the manager or the backend (4xx)."""
    address = request.remote or "unknown"
    if (refusal := request.app[OFFER_LIMITER].refusal(address)) is not None:
        reason, retry = refusal
        return error(429, reason, **{"Retry-After": retry})
    try:
        return await request.app[MANAGER].offer(offer, address)
    except CapacityError as exc:
        return error(503, str(exc), **{"Retry-After": "5"})
    except Refused as exc:
        return error(exc.status, exc.reason)
    except InputError as exc:  # the backend refused the prompt or settings
        return error(400, str(exc))
