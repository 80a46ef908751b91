"""PCM in: what feeds an avatar session's audio (an agent's WebSocket messages, a viewer's microphone frames)
turned into the model's mono float32 at its rate (16 kHz).

Resampling is FFmpeg's swresample through PyAV, one filter per source that keeps its state from one message
or frame to the next, so audio cut in pieces comes out as if resampled whole (no clicks at the seams);
`drain` hands over what the filter still holds (a few samples: the end of an utterance). Channels are
averaged to mono after resampling (swresample's own downmix gains +3 dB on identical channels).
"""
from __future__ import annotations

import av
import numpy as np

from ..errors import InputError

SUPPORTED_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
MAX_MESSAGE_S = 1.0  # the most audio one WebSocket message may carry


class Resampler:
    """Decoded audio frames (any rate, layout, sample format) → mono float32 at `rate`, stateful."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._swr: av.AudioResampler | None = None

    def __call__(self, frame: av.AudioFrame) -> np.ndarray:
        if self._swr is None:
            self._swr = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=self.rate)
        return _mono(self._swr.resample(frame))

    def drain(self) -> np.ndarray:
        """What the filter still holds; the next frame starts a fresh filter."""
        if self._swr is None:
            return np.zeros(0, np.float32)
        swr, self._swr = self._swr, None
        return _mono(swr.resample(None))


def _mono(frames: list[av.AudioFrame]) -> np.ndarray:
    parts = [f.to_ndarray().mean(axis=0, dtype=np.float32) for f in frames]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def check_rate(rate: int) -> None:
    if rate not in SUPPORTED_RATES:
        raise InputError(f"sample rate {rate} Hz is not supported (supported: {', '.join(map(str, SUPPORTED_RATES))})")


class PcmStream:
    """s16le mono messages at `rate` → float32 at `model_rate`; rates other than the model's are resampled."""

    def __init__(self, rate: int, model_rate: int) -> None:
        check_rate(rate)
        self.rate, self.model_rate = rate, model_rate
        self._resampler = Resampler(model_rate)

    def samples(self, data: bytes) -> np.ndarray:
        """One message; InputError (nothing consumed) when it is empty, odd-sized or longer than MAX_MESSAGE_S."""
        if not data:
            raise InputError("empty audio message: send s16le mono samples")
        if len(data) % 2:
            raise InputError(f"audio message of {len(data)} bytes: s16le samples take 2 bytes each, so the count must be even")
        seconds = len(data) / 2 / self.rate
        if seconds > MAX_MESSAGE_S:
            raise InputError(f"audio message carries {seconds:.2f} s at {self.rate} Hz; at most {MAX_MESSAGE_S:g} s per "
                             "message: send it in pieces")
        pcm = np.frombuffer(data, "<i2")
        if self.rate == self.model_rate:
            return pcm.astype(np.float32) / 32768
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = self.rate
        return self._resampler(frame)

    def drain(self) -> np.ndarray:
        return self._resampler.drain()

    def set_rate(self, rate: int) -> np.ndarray:
        """Messages from now on are at `rate`; returns what the previous rate's filter still held."""
        check_rate(rate)
        rest = self.drain()
        self.rate = rate
        return rest

    def reset(self) -> None:
        """Forget what the filter holds (an interruption: that audio is dropped)."""
        self.drain()
