"""Security basics: where the bearer token comes from, the rule that an exposed server has one, the
token check, the cross-site (Origin) check, and the rate limits (control messages per session, offers
per client address)."""
from __future__ import annotations

import hmac
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

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


WS_TOKEN_PREFIX = "bearer."  # a browser's WebSocket cannot set headers: it offers the subprotocol "bearer.<token>"


def given_token(request: web.Request) -> str | None:
    """The bearer token a request carries: `Authorization: Bearer <token>`, or — for a WebSocket upgrade,
    whose browser API cannot set headers — a `Sec-WebSocket-Protocol` entry `bearer.<token>` (never the URL,
    which access logs keep)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return given.strip()
    if request.headers.get("Upgrade", "").lower() == "websocket":
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        return next((p[len(WS_TOKEN_PREFIX):] for p in offered if p.startswith(WS_TOKEN_PREFIX)), None)
    return None


def bearer_auth(token: str | None):
    """Middleware refusing API calls without the bearer token (when one is set; see `given_token`)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return await handler(request)
        given = given_token(request)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            return web.json_response({"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware


class RateLimiter:
    """Token bucket: `rate` events per second with bursts of up to `burst` (default `rate`); over the
    limit is refused, not queued."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._tokens = self.burst
        self._last = time.monotonic()

    def wait(self) -> float:
        """0 when an event may go ahead now (and counts it), else the seconds until one may."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def allow(self) -> bool:
        return self.wait() == 0.0


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def origin_check(allowed: Iterable[str]):
    """Middleware refusing state-changing requests a browser sends from another site (CSRF): with an
    `Origin` header, a POST/DELETE/PATCH must come from this server's own origin or one in `allowed`.
    Requests without `Origin` (curl, the Python client) pass: no browser sent them on a page's behalf."""
    allowed = frozenset(o.rstrip("/").lower() for o in allowed)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in SAFE_METHODS or (refusal := cross_site(request, allowed)) is None:
            return await handler(request)
        return web.json_response({"error": refusal}, status=403)

    return middleware


CORS_METHODS = "GET, POST, DELETE, PATCH, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, If-Match"
CORS_EXPOSED = "Location, ETag, Link, Retry-After, Accept-Post"  # what WHIP/WHEP clients read off a reply


def cors(allowed: Iterable[str]):
    """Middleware letting the pages of the `--allow-origin` sites call the API from a browser (WHIP/WHEP
    players, a control page elsewhere): their preflight `OPTIONS` is answered here, before the token check
    (a preflight never carries the token), and their replies say they may read them. Another site's preflight
    is a 403 with the reason; this server's own page needs none of it."""
    allowed = frozenset(o.rstrip("/").lower() for o in allowed)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = (request.headers.get("Origin") or "").rstrip("/").lower()
        listed = origin in allowed
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            if not listed:
                reason = cross_site(request, allowed) or f"{origin} is this server's own origin: it needs no preflight"
                return web.json_response({"error": reason}, status=403)
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": request.headers["Origin"], "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS, "Access-Control-Max-Age": "600", "Vary": "Origin"})
        response = await handler(request)
        if listed:
            response.headers.update({"Access-Control-Allow-Origin": request.headers["Origin"],
                                     "Access-Control-Expose-Headers": CORS_EXPOSED, "Vary": "Origin"})
        return response

    return middleware


def cross_site(request: web.Request, allowed: Iterable[str]) -> str | None:
    """Why a request a browser sent from another site is refused (None: no `Origin`, this server's own, or
    one in `allowed`). Also for WebSocket upgrades, which are GETs that change state."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    origin = origin.rstrip("/").lower()
    if urlsplit(origin).netloc == request.host.lower() or origin in {o.rstrip("/").lower() for o in allowed}:
        return None
    return (f"cross-site request from {origin!r} refused: the page must come from this server, or start it with "
            "--allow-origin ORIGIN")


class AddressRateLimiter:
    """One token bucket per client address (`rate` per second, bursts of `burst`), for requests that
    cost the server real work (opening a session); the oldest idle addresses are forgotten beyond `keep`."""

    def __init__(self, rate: float, burst: int, keep: int = 4096) -> None:
        self.rate, self.burst, self.keep = rate, burst, keep
        self._buckets: OrderedDict[str, RateLimiter] = OrderedDict()  # least recently seen first

    def refusal(self, address: str) -> tuple[str, str] | None:
        """(reason, Retry-After seconds) when `address` is over its rate, else None (and it is counted)."""
        bucket = self._buckets.pop(address, None) or RateLimiter(self.rate, self.burst)
        self._buckets[address] = bucket
        while len(self._buckets) > self.keep:
            self._buckets.popitem(last=False)
        wait = bucket.wait()
        if wait == 0.0:
            return None
        return (f"too many new sessions from this address (limit {self.rate:g}/s, bursts of {self.burst}); "
                f"retry in {wait:.1f} s", str(max(1, math.ceil(wait))))
