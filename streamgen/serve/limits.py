"""Security basics: where the bearer token comes from, the rule that an exposed server has one, the
token check, and the per-session control-message rate limit."""
from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .ice import is_loopback

TOKEN_ENV = "STREAMGEN_TOKEN"

OPEN_PATHS = ("/", "/health")  # the web page and liveness stay reachable without the token
OPEN_PREFIXES = ("/static/",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_token(token_file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The API token from `--token-file` (first line) or $STREAMGEN_TOKEN — never from argv, where `ps` shows it."""
    environ = os.environ if environ is None else environ
    if token_file is not None:
        try:
            lines = Path(token_file).read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the token file {token_file}: {exc}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
        return token
    return environ.get(TOKEN_ENV) or None


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve an unauthenticated API beyond this machine."""
    if token is None and not is_loopback(host):
        raise ValueError(f"refusing to bind {host} without a token: anyone who can reach it could open sessions. Set "
                         f"${TOKEN_ENV} or --token-file FILE (clients send 'Authorization: Bearer TOKEN'), "
                         "or bind 127.0.0.1")


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
