"""Security basics: the optional bearer token and per-session control-message rate limit."""
from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

OPEN_PATHS = ("/", "/health")  # the web page and liveness stay reachable without the token
OPEN_PREFIXES = ("/static/",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_auth(token: str | None):
    """Middleware refusing API calls without `Authorization: Bearer <token>` (when a token is set)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return web.json_response({"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware


class RateLimiter:
    """Token bucket: `rate` events per second with bursts of up to `rate`; over the limit is refused, not queued."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
