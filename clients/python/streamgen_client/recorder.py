"""MP4 recording of received frames (PyAV, H.264), timed by arrival so holds and drops show as they played."""
from __future__ import annotations

import fractions

import av
import numpy as np

TIME_BASE = fractions.Fraction(1, 1000)  # milliseconds of arrival time


class Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        self._out = av.open(path, "w", options={"movflags": "+faststart"})
        self._stream = None
        self._t0: float | None = None
        self._last_pts = -1
        self.frames = 0

    def write(self, image: np.ndarray, arrival: float) -> None:
        if self._stream is None:
            self._stream = self._out.add_stream("libx264", rate=30)
            self._stream.width, self._stream.height = image.shape[1] // 2 * 2, image.shape[0] // 2 * 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.time_base = TIME_BASE
            self._stream.codec_context.time_base = TIME_BASE
            self._stream.options = {"preset": "veryfast", "crf": "20"}
            self._t0 = arrival
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: self._stream.height, : self._stream.width]),
                                           format="rgb24")
        frame.pts = max(self._last_pts + 1, round((arrival - self._t0) * 1000))
        frame.time_base = TIME_BASE
        self._last_pts = frame.pts
        self._out.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        if self._stream is not None:
            self._out.mux(self._stream.encode())
        self._out.close()
