"""What an avatar session sends besides the offer: a speech file as a live audio track, paced in real time
like a microphone, and the reference picture as a data URL. PyAV decodes both when they are loaded, so a
missing or unreadable file is refused with its name and the reason before any connection is made."""
from __future__ import annotations

import asyncio
import base64
import fractions
import io
import time
from pathlib import Path

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

# AUDIO_RATE is Opus's clock: the file is resampled to it once, on load, so the encoder only upmixes
from .recorder import AUDIO_RATE

FRAME_SAMPLES = 960  # 20 ms: one Opus packet per frame
MAX_BEHIND_S = 0.1  # a track this late (a stalled loop, a reconnect) starts its clock again rather than burst
REFERENCE_MAX_BYTES = 160 * 1024  # base64 of this plus the SDP fits the server's 256 KiB offer body
REFERENCE_SIDE = 192  # a larger file is sent as a PNG scaled to this longer side (the model uses 32×32)
MAX_PICTURE_FILE_BYTES = 64 * 1024 * 1024
PICTURE_KINDS = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg"}


class MediaFileError(ValueError):
    """A file named on the command line (or to StreamClient) cannot be used; the message says which and why."""


# --- speech ----------------------------------------------------------------------------------------
def load_speech(path: str | Path) -> np.ndarray:
    """A speech file (WAV; any rate, any channels) → int16 mono samples at AUDIO_RATE."""
    path = Path(path)
    if not path.is_file():
        raise MediaFileError(f"audio file {path} does not exist")
    unreadable = f"audio file {path} cannot be read as audio (expected a WAV file)"
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaFileError(f"{unreadable}: it holds no audio stream")
            samples = _decode_mono(container)
    except av.error.FFmpegError as exc:
        raise MediaFileError(f"{unreadable}: {getattr(exc, 'strerror', None) or exc}") from None
    if not len(samples):
        raise MediaFileError(f"audio file {path} holds no samples")
    return samples


def _decode_mono(container: av.container.InputContainer) -> np.ndarray:
    """Every sample of the container's first audio stream, resampled to int16 mono at AUDIO_RATE."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
    parts = [out.to_ndarray().reshape(-1) for frame in container.decode(audio=0) for out in resampler.resample(frame)]
    parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


class SpeechTrack(MediaStreamTrack):
    """The samples as a live audio track, 20 ms per frame at the pace of the wall clock, then silence:
    what a microphone would send. `done` once every sample of the file has been sent."""

    kind = "audio"

    def __init__(self, samples: np.ndarray) -> None:
        super().__init__()
        self.samples = np.asarray(samples, np.int16)
        self.sent = 0  # samples sent so far (the file's, then silence)
        self._due: float | None = None  # time.monotonic() at which the next frame is due

    @property
    def duration_s(self) -> float:
        return len(self.samples) / AUDIO_RATE

    @property
    def done(self) -> bool:
        return self.sent >= len(self.samples)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._wait_until_due()
        chunk = np.zeros(FRAME_SAMPLES, np.int16)
        part = self.samples[self.sent:self.sent + FRAME_SAMPLES]
        chunk[:len(part)] = part
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, self.sent, fractions.Fraction(1, AUDIO_RATE)
        self.sent += FRAME_SAMPLES
        return frame

    async def _wait_until_due(self) -> None:
        """Real-time pacing; far behind (the first frame, a stall, a reconnect) the clock restarts now, so
        speech is never sent faster than it is spoken."""
        now = time.monotonic()
        if self._due is None or now - self._due > MAX_BEHIND_S:
            self._due = now
        elif self._due > now:
            await asyncio.sleep(self._due - now)
        self._due += FRAME_SAMPLES / AUDIO_RATE


# --- received audio --------------------------------------------------------------------------------
class MonoConverter:
    """Received audio frames (Opus decodes to s16 stereo at 48 kHz) → float32 mono at AUDIO_RATE."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)

    def __call__(self, frame: av.AudioFrame) -> np.ndarray:
        parts = [out.to_ndarray().reshape(-1) for out in self._resampler.resample(frame)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# --- the reference picture -------------------------------------------------------------------------
def reference_data_url(path: str | Path) -> str:
    """A face picture (PNG or JPEG) → a `data:image/…;base64,` URL for the offer's `reference`: the file as it
    is when small enough, else a PNG of it scaled down to REFERENCE_SIDE (the offer body has a size limit)."""
    path = Path(path)
    if not path.is_file():
        raise MediaFileError(f"picture file {path} does not exist")
    if path.stat().st_size > MAX_PICTURE_FILE_BYTES:
        raise MediaFileError(f"picture file {path} is over the {MAX_PICTURE_FILE_BYTES // 2**20} MiB limit")
    data = path.read_bytes()
    image = decode_picture(data, path)
    kind = next((k for magic, k in PICTURE_KINDS.items() if data.startswith(magic)), None)
    if kind is None or len(data) > REFERENCE_MAX_BYTES:
        data, kind = encode_png(shrink(image, REFERENCE_SIDE)), "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def decode_picture(data: bytes, path: Path) -> np.ndarray:
    """Encoded picture bytes → uint8 [H, W, 3] RGB, or a MediaFileError naming the file."""
    try:
        with av.open(io.BytesIO(data)) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (av.error.FFmpegError, IndexError, StopIteration, ValueError):
        raise MediaFileError(f"picture file {path} cannot be decoded as a picture (expected PNG or JPEG)") from None


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """Scaled (area filter, aspect kept) so the longer side is at most `side`."""
    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return image
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return frame.reformat(width=size[0], height=size[1], interpolation="AREA").to_ndarray(format="rgb24")


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] → PNG bytes."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="image2pipe") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return buf.getvalue()
