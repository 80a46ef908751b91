"""A session published live to RTMP(S): the packets its viewer is sent, remuxed into FLV (no second encode)
and pushed from a thread of its own, so a slow or stuck network never touches the event loop or the stream.

- Where: only hosts the operator allowed at start (`streamgen serve --publish-allow live.example.com`);
  anything else is refused before a connection is made (no request forgery through the API).
- What: H.264 only (RTMP carries H.264; a viewer that negotiated VP8 cannot be published). The push starts
  on a keyframe (it asks the encoder for one) and is stamped on its own clock, frame k at k / fps — the
  session's packets are already paced in real time by its track, so the push is live, not a burst.
- Back-pressure: at most QUEUE_S seconds of packets wait for the network; past that the publication stops
  with an error the session's viewer is told of (the stream goes on).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import av

from ..errors import InputError
from .recording import KeyframeSource, PacketMux

log = logging.getLogger(__name__)

QUEUE_S = 5.0
SCHEMES = ("rtmp", "rtmps")


class PublishRefused(InputError):
    """A well-formed URL this server may not publish to (publishing off, or a host not allowed): HTTP 403."""


class PublishPolicy:
    """The operator's allow-list of RTMP hosts (`host` or `host:port`)."""

    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        self.allow = tuple(a.lower() for a in allow)

    def check(self, url: Any) -> str:
        """`url` if it is an rtmp(s) URL to an allowed host; InputError saying why not otherwise."""
        if not isinstance(url, str) or len(url) > 2048:
            raise InputError("url: expected an rtmp:// or rtmps:// URL of at most 2048 characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InputError(f"url: not a URL: {exc}") from None
        if parts.scheme.lower() not in SCHEMES or not parts.hostname:
            raise InputError("url: expected rtmp://host[:port]/app/stream-key (or rtmps://)")
        if not self.allow:
            raise PublishRefused("publishing is off on this server (its operator starts it with --publish-allow HOST)")
        host = parts.hostname.lower()
        if host not in self.allow and f"{host}:{port or 1935}" not in self.allow:
            raise PublishRefused(f"url: host {host!r} is not one this server may publish to")
        return url


class Publication:
    """`write(packet, encoder)` on the event loop after each packet is encoded; a worker thread pushes.
    `on_error(message)` may be called from that thread: it must be thread-safe (call_soon_threadsafe)."""

    def __init__(self, url: str, codec: str, fps: float, on_error: Callable[[str], None]) -> None:
        if codec != "h264":
            raise InputError(f"RTMP carries H.264; this viewer's video is {codec}: reconnect with H.264 to publish")
        self.url, self.fps = url, fps
        self.started = time.time()
        self.stopped: float | None = None
        self.error: str | None = None
        self._on_error = on_error
        self._queue: queue.Queue[tuple[bytes, tuple[int, int]] | None] = queue.Queue(max(1, round(QUEUE_S * fps)))
        self._mux = PacketMux(url, "flv", {}, "h264", fps)
        self._waiting_keyframe = True
        threading.Thread(target=self._push, name="publish", daemon=True).start()

    @property
    def frames(self) -> int:
        return self._mux.frames

    def write(self, packet: av.Packet, encoder: KeyframeSource) -> None:
        if self.stopped is not None:
            return
        if self._waiting_keyframe:
            if not packet.is_keyframe:
                encoder.request_keyframe()
                return
            self._waiting_keyframe = False
        try:
            self._queue.put_nowait((bytes(packet), encoder.size()))
        except queue.Full:
            self._fail(f"the network to {urlsplit(self.url).hostname} is slower than the video: over {QUEUE_S:g} s "
                       "of packets were waiting")

    def stop(self) -> None:
        """End the push (the worker closes the FLV after what is queued); idempotent."""
        if self.stopped is None:
            self.stopped = time.time()
            self._queue.put(None)

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
            log.warning("publication to %s stopped: %s", self.url, message)
            self._on_error(message)
        self.stop()

    def _push(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                data, size = item
                self._mux.write(av.Packet(data), size)
        except (av.error.FFmpegError, OSError) as exc:
            self._fail(f"publishing to {urlsplit(self.url).hostname} failed: {type(exc).__name__}: {exc}"[:300])
        finally:
            try:
                self._mux.close()
            except (av.error.FFmpegError, OSError):
                pass

    def describe(self) -> dict[str, Any]:
        return {"publishing": self.stopped is None, "url": _redacted(self.url), "frames": self.frames,
                "seconds": round(self.frames / self.fps, 3), "started": self.started, "stopped": self.stopped,
                "error": self.error}


def _redacted(url: str) -> str:
    """The URL without its last path segment (an RTMP stream key is a secret)."""
    head, _, _ = url.rpartition("/")
    return f"{head}/…"
