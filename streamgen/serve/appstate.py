"""What every route module shares: the application's state keys and the one JSON error reply."""
from __future__ import annotations

from aiohttp import web

from ..backends import Backend
from .config import ServeConfig
from .manager import SessionManager
from .metrics import Metrics

MAX_BODY_BYTES = 256 * 1024
MANAGER = web.AppKey("manager", SessionManager)
CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", Metrics)
BACKEND = web.AppKey("backend", Backend)


def error(status: int, message: str, **headers: str) -> web.Response:
    """`{"error": "<one line>"}` with a fitting status: every failure of the HTTP API looks like this."""
    return web.json_response({"error": message}, status=status, headers=headers or None)
