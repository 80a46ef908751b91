"""Server settings: one dataclass the CLI fills and tests construct directly."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.names import SCHEDULERS
from ..bundles.bundle import DEFAULT_MODEL
from ..engine.threads import default_threads

WEB_ROOT = Path(__file__).resolve().parent / "web"  # the browser client, package data


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise: the API has no TLS of its own
    port: int = 8080  # 0 picks a free port (tests)
    model: str = DEFAULT_MODEL
    model_dir: str | None = None  # a real model family's local files (see `streamgen models show NAME`)
    precision: dict[str, str] = field(default_factory=dict)  # load_bundle's dtype / quant / compile / decoder (CLI --dtype …)
    prompt: str | None = None  # used when an offer carries none; None: the model's example prompt
    max_sessions: int = 4
    max_sessions_per_ip: int = 2
    token: str | None = None  # bearer token for the HTTP API (/health and the web page stay open)
    ice_servers: list[str] = field(default_factory=list)  # stun:/turn: URLs; none by default (loopback/LAN)
    display_size: int = 256  # frames are upscaled (nearest) so their longer side reaches this
    codec: str = "vp8"  # preferred video codec (vp8 | h264); the other is accepted when the peer lacks it
    bitrate: int | None = None  # bits/s; None: from display size and fps (see encoder.default_bitrate)
    keyframe_interval_s: float = 2.0  # the track encodes itself, so periodic keyframes replace PLI handling
    grace_s: float = 10.0  # a session whose peer went away waits this long for a reconnect
    connect_timeout_s: float = 15.0  # an answered offer must connect within this
    queue_chunks: int = 2  # most chunks generated ahead of playback (fewer when chunks compute fast)
    stats_interval_s: float = 1.0
    control_rate: float = 20.0  # control messages per second per session (token bucket, burst = rate)
    offer_rate: float = 2.0  # sessions opened per second per client address (POST /offer, /whep) ...
    offer_burst: int = 10  # ... in bursts of up to this many
    allowed_origins: tuple[str, ...] = ()  # other sites whose pages may call the API (this server's own always may)
    threads: int | None = None  # torch intra-op threads; None: see torch_threads()
    backend: str = "local"  # where streams run: local (in process) or ray
    scheduler: str = "engine"  # local backend: one batched engine loop for all sessions, or "threads" (one per session)
    ray: dict[str, Any] = field(default_factory=dict)  # make_backend keywords for the ray backend
    web_root: Path = WEB_ROOT
    publish_allow: tuple[str, ...] = ()  # RTMP hosts sessions may be published to (`/sessions/{id}/publish`)
    recordings_dir: Path | None = None  # session recordings (`/sessions/{id}/recording`); None: recording is off
    jobs_dir: Path | None = None  # render jobs (`/jobs`): their SQLite store and outputs; None: no jobs API
    jobs_concurrency: int = 1  # render jobs running at once
    jobs_max_queued: int = 100
    jobs_webhook_allow: tuple[str, ...] = ()  # URL prefixes job webhooks may use (jobs/webhooks.py)

    def __post_init__(self) -> None:
        if not self.offer_rate > 0 or self.offer_burst < 1:
            raise ValueError(f"offer_rate must be > 0 and offer_burst ≥ 1, got {self.offer_rate}, {self.offer_burst}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; known: {', '.join(SCHEDULERS)}")

    def torch_threads(self) -> int:
        """One engine thread computes every session: it gets the idle cores; a thread per session a share."""
        return self.threads or default_threads(1 if self.scheduler == "engine" else self.max_sessions)
