"""A session's recording: the packets its viewer is sent, muxed to a file as they go out (no second
encode), in a container that stays playable if the server dies mid-recording.

H.264 goes to fragmented MP4 (one fragment per frame, `empty_moov`: no index written at the end), VP8 to
WebM (MP4 has no VP8 mapping; Matroska clusters are self-describing), both with every packet flushed to
disk as it is written. A recording starts on a keyframe (it asks the encoder for one) and is stamped on
its own clock: frame k at k / fps, as the viewer saw it paced, held frames included.
"""
from __future__ import annotations

import fractions
import time
from pathlib import Path
from typing import Any, Protocol

import av

TIME_BASE = fractions.Fraction(1, 90_000)
CONTAINERS = {"h264": ("mp4", {"movflags": "empty_moov+default_base_moof+frag_every_frame", "flush_packets": "1"}),
              "vp8": ("webm", {"live": "1", "cluster_time_limit": "250", "flush_packets": "1"})}


class KeyframeSource(Protocol):
    """What a recording needs of the encoder whose packets it takes."""

    codec: str

    def request_keyframe(self) -> None: ...

    def size(self) -> tuple[int, int]: ...


class PacketMux:
    """Encoded packets → a container (a file, or a URL such as rtmp://), restamped on its own clock: packet k
    at k / fps. Opened with the first packet; the caller starts it on a keyframe."""

    def __init__(self, target: str, format: str, options: dict[str, str], codec: str, fps: float) -> None:
        self.target, self.format, self.options, self.codec = target, format, options, codec
        self.fps = fractions.Fraction(fps).limit_denominator(1001)
        self.frames = 0
        self._out: Any = None
        self._stream: Any = None

    @property
    def opened(self) -> bool:
        return self._out is not None

    def write(self, packet: av.Packet, size: tuple[int, int]) -> None:
        if self._out is None:
            self._out = av.open(self.target, "w", format=self.format, options=self.options)
            self._stream = self._out.add_stream(self.codec, rate=self.fps)
            self._stream.width, self._stream.height, self._stream.pix_fmt = *size, "yuv420p"
            self._stream.time_base = TIME_BASE
        packet.stream = self._stream
        packet.pts = packet.dts = round(self.frames * TIME_BASE.denominator / self.fps)
        packet.time_base = TIME_BASE
        self._out.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


class Recording:
    """Packets in, a file out; `write` is called on the event loop right after each packet is encoded."""

    def __init__(self, stem: Path, codec: str, fps: float) -> None:
        if codec not in CONTAINERS:
            raise ValueError(f"cannot record codec {codec!r}; known: {', '.join(CONTAINERS)}")
        self.format, options = CONTAINERS[codec]
        self.codec = codec
        self.path = stem.with_name(f"{stem.name}.{self.format}")
        self.fps = fractions.Fraction(fps).limit_denominator(1001)
        self.started = time.time()
        self.stopped: float | None = None
        self._mux = PacketMux(str(self.path), self.format, options, codec, fps)

    @property
    def frames(self) -> int:
        return self._mux.frames

    @property
    def content_type(self) -> str:
        return f"video/{self.format}"

    @property
    def seconds(self) -> float:
        return self.frames / float(self.fps)

    def write(self, packet: av.Packet, encoder: KeyframeSource) -> None:
        if self.stopped is not None:
            return
        if encoder.codec != self.codec:
            raise ValueError(f"recording {self.codec}, got a {encoder.codec} packet")
        if not self._mux.opened:
            if not packet.is_keyframe:
                encoder.request_keyframe()  # the first recorded packet must decode on its own
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mux.write(packet, encoder.size())

    def stop(self) -> None:
        """Close the file (the MP4's last fragment, the WebM's last cluster); idempotent."""
        if self.stopped is not None:
            return
        self.stopped = time.time()
        self._mux.close()

    def describe(self) -> dict[str, Any]:
        return {"recording": self.stopped is None, "format": self.format, "frames": self.frames,
                "seconds": round(self.seconds, 3), "started": self.started, "stopped": self.stopped,
                "bytes": self.path.stat().st_size if self.path.exists() else 0}
