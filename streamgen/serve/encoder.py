"""Model frames → encoded video packets, with the codec and bitrate chosen here rather than by aiortc.

aiortc has no public bitrate API (aiortc#402) and its encoder limits are module constants shared by
every connection (what Scope patches at import). So the track encodes with PyAV itself, with a
deliberate CBR target and keyframe interval, and hands aiortc finished packets to packetize.
"""
from __future__ import annotations

import fractions

import av
import numpy as np

CODECS = {"vp8": "video/VP8", "h264": "video/H264"}
RTP_CLOCK = 90_000


def default_bitrate(width: int, height: int, fps: float) -> int:
    """≈0.15 bit per pixel per frame, 300 kb/s–6 Mb/s: plenty for generated video on a LAN."""
    return int(min(6_000_000, max(300_000, 0.15 * width * height * fps)))


class DisplayScaler:
    """Nearest-neighbour upscale so the longer side reaches `size` (encoders choke on 32-px frames);
    never downscales; output sides are even, as yuv420p needs."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._index: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] → uint8 [N, H', W', 3]."""
        h, w = frames.shape[1:3]
        if (h, w) not in self._index:
            scale = max(1.0, self.size / max(h, w))
            th, tw = (max(2, round(d * scale / 2) * 2) for d in (h, w))
            self._index[(h, w)] = ((np.arange(th) * h // th), (np.arange(tw) * w // tw))
        rows, cols = self._index[(h, w)]
        if len(rows) == h and len(cols) == w:
            return frames
        return frames[:, rows][:, :, cols]


class VideoEncoder:
    """One stream's encoder: `encode(image, tick)` → packets stamped in the 90 kHz RTP clock."""

    def __init__(self, codec: str, fps: float, bitrate: int | None, keyframe_interval_s: float) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
        self.codec = codec
        self.rate = fractions.Fraction(fps).limit_denominator(1001)
        self.bitrate = bitrate
        self.gop = max(1, round(keyframe_interval_s * fps))
        self._ctx: av.VideoCodecContext | None = None
        self._keyframe = False

    def request_keyframe(self) -> None:
        """Make the next frame a keyframe (a recording starts on one)."""
        self._keyframe = True

    def size(self) -> tuple[int, int]:
        """(width, height) of the encoded frames; only known once the first frame was encoded."""
        if self._ctx is None:
            raise RuntimeError("the encoder has not encoded a frame yet")
        return self._ctx.width, self._ctx.height

    def encode(self, image: np.ndarray, tick: int) -> av.Packet | None:
        """Encode frame `tick` (ticks count frame intervals since the track started); None when the
        rate control skips it. No lookahead and no B-frames: never more than one packet per frame."""
        h, w = image.shape[:2]
        if self._ctx is None:
            self._ctx = self._open(w, h)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = tick
        if self._keyframe:
            frame.pict_type, self._keyframe = av.video.frame.PictureType.I, False
        packets = self._ctx.encode(frame)
        if len(packets) > 1:
            raise RuntimeError(f"{self.codec} encoder returned {len(packets)} packets for one frame")
        for packet in packets:
            packet.pts = round(tick * RTP_CLOCK / self.rate)
            packet.time_base = fractions.Fraction(1, RTP_CLOCK)
        return packets[0] if packets else None

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        bitrate = self.bitrate or default_bitrate(width, height, float(self.rate))
        ctx = av.CodecContext.create("libvpx" if self.codec == "vp8" else "libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.framerate, ctx.time_base = self.rate, 1 / self.rate
        ctx.bit_rate, ctx.gop_size = bitrate, self.gop
        ctx.thread_count = 1  # small frames: threads cost more than they save (measured 30× slower on 2 cores)
        rate = {"minrate": str(bitrate), "maxrate": str(bitrate), "bufsize": str(bitrate)}  # CBR, 1 s buffer
        if self.codec == "vp8":
            ctx.qmin, ctx.qmax = 2, 56
            ctx.options = {**rate, "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "static-thresh": "1",
                           "undershoot-pct": "100", "overshoot-pct": "15", "partitions": "0"}
        else:  # constrained baseline, what browsers and aiortc offer (profile-level-id 42e01f / 42001f)
            ctx.profile = "Baseline"
            ctx.options = {**rate, "preset": "veryfast", "tune": "zerolatency", "level": "31"}
        return ctx
