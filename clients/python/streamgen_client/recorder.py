"""MP4 recording of what a client receives (PyAV): H.264 video timed by arrival, so holds and drops show as
they played, and, for an avatar session, its audio as an AAC track on the same clock."""
from __future__ import annotations

import fractions

import av
import numpy as np

TIME_BASE = fractions.Fraction(1, 1000)  # milliseconds of arrival time
AUDIO_RATE = 48000  # what WebRTC's Opus decodes to: write_audio takes mono float32 at this rate
AUDIO_GAP_S = 0.2  # audio arriving this much later than the samples before it end (loss, a reconnect): silence between
AAC_BITRATE = 96_000


class Recorder:
    """`write(image, arrival)` per video frame, `write_audio(samples, arrival)` per audio frame (with
    `audio=True`), `close()`. Both clocks start at the first thing received. The file's streams are
    opened at the first video frame (its size is needed); audio received before it waits in memory."""

    def __init__(self, path: str, audio: bool = False) -> None:
        self.path = path
        self.audio = audio
        self._out = av.open(path, "w", options={"movflags": "+faststart"})
        self._stream: av.VideoStream | None = None
        self._audio_stream: av.AudioStream | None = None
        self._t0: float | None = None
        self._last_pts = -1
        self._early_audio: list[tuple[np.ndarray, float]] = []  # before the first video frame
        self.frames = 0
        self.audio_samples = 0  # samples written to the AAC track (silence filled in gaps included)

    def write(self, image: np.ndarray, arrival: float) -> None:
        if self._t0 is None:
            self._t0 = arrival
        if self._stream is None:
            self._open(image.shape[1] // 2 * 2, image.shape[0] // 2 * 2)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: self._stream.height, : self._stream.width]),
                                           format="rgb24")
        frame.pts = max(self._last_pts + 1, round((arrival - self._t0) * 1000))
        frame.time_base = TIME_BASE
        self._last_pts = frame.pts
        self._out.mux(self._stream.encode(frame))
        self.frames += 1

    def write_audio(self, samples: np.ndarray, arrival: float) -> None:
        """Mono float32 samples at AUDIO_RATE whose last one arrived at `arrival` (time.monotonic())."""
        if not self.audio:
            raise ValueError("this recording has no audio track: open the Recorder with audio=True")
        if self._t0 is None:
            self._t0 = arrival
        if self._audio_stream is None:
            self._early_audio.append((np.asarray(samples, np.float32), arrival))
            return
        self._place_audio(np.asarray(samples, np.float32), arrival)

    def _open(self, width: int, height: int) -> None:
        """Every stream is added before the first packet (the container's header)."""
        stream = self._out.add_stream("libx264", rate=30)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base = TIME_BASE
        stream.options = {"preset": "veryfast", "crf": "20"}
        self._stream = stream
        if self.audio:
            self._audio_stream = self._out.add_stream("aac", rate=AUDIO_RATE)
            self._audio_stream.layout = "mono"
            self._audio_stream.time_base = fractions.Fraction(1, AUDIO_RATE)
            self._audio_stream.bit_rate = AAC_BITRATE
            for samples, arrival in self._early_audio:
                self._place_audio(samples, arrival)
            self._early_audio.clear()

    def _place_audio(self, samples: np.ndarray, arrival: float) -> None:
        """Samples follow the ones before them without a gap, unless they arrived AUDIO_GAP_S or more
        after those would have ended: then silence fills the gap, so what follows stays beside its video."""
        assert self._t0 is not None
        start = round((arrival - self._t0) * AUDIO_RATE) - len(samples)
        if start - self.audio_samples >= AUDIO_GAP_S * AUDIO_RATE:
            self._encode_audio(np.zeros(start - self.audio_samples, np.float32))
        self._encode_audio(samples)

    def _encode_audio(self, samples: np.ndarray) -> None:
        assert self._audio_stream is not None
        if not len(samples):
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.reshape(1, -1)), format="flt", layout="mono")
        frame.sample_rate, frame.time_base, frame.pts = AUDIO_RATE, self._audio_stream.time_base, self.audio_samples
        self._out.mux(self._audio_stream.encode(frame))
        self.audio_samples += len(samples)

    def close(self) -> None:
        if self._stream is not None:
            self._out.mux(self._stream.encode())
        if self._audio_stream is not None:
            self._out.mux(self._audio_stream.encode())
        self._out.close()
