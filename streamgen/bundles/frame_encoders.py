"""Input frames → a model's latents, for video-to-video (`streamgen.engine.v2v`).

The embedded model's latents are its pixels (a frame in [0, 1] is the latent 2·p − 1), so its encoder is
exact and free: a camera frame is centre-cropped to the model's aspect, resized (PyAV's swscale, area
filter) to 32×32 and scaled. Models whose latents come from the Wan VAE would need its streaming encoder
(first frame alone, then 4-frame groups; spec A2), which is not built: they are refused with that reason.
"""
from __future__ import annotations

import av
import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .bundle import ModelBundle
from .embedded import PixelDecoder, frames_to_latents

FIT = 4  # fit() resizes to this multiple of the model's size first, crops there, then block-averages


class PixelFrameEncoder:
    """Frames ↔ pixel latents of size height × width, one latent frame per video frame."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def frames_for(self, latent_frames: int) -> int:
        return latent_frames

    def fit(self, frame: av.VideoFrame | np.ndarray) -> np.ndarray:
        """Any frame (a decoded WebRTC frame, an RGB array) → uint8 [height, width, 3]: the centred crop of
        the model's aspect, resized with an area filter. Cheap at camera sizes (≈ 0.2 ms for 640×480): one
        swscale pass to FIT× the model's size covering it, the crop there (to 1/FIT of a model pixel), then
        FIT×FIT block means; full-resolution RGB is never made."""
        if isinstance(frame, np.ndarray):
            if frame.shape[:2] == (self.height, self.width) and frame.dtype == np.uint8:
                return frame
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
        H, W = FIT * self.height, FIT * self.width
        scale = max(W / frame.width, H / frame.height)
        w, h = max(W, round(frame.width * scale)), max(H, round(frame.height * scale))
        image = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
        top, left = (h - H) // 2, (w - W) // 2
        blocks = image[top:top + H, left:left + W].reshape(self.height, FIT, self.width, FIT, 3)
        return (blocks.mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)

    def encode(self, frames: np.ndarray) -> Tensor:
        """uint8 [N, height, width, 3] → latents [1, N, 3, height, width] in [−1, 1] (exact)."""
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be [N, {self.height}, {self.width}, 3], got {frames.shape}")
        return frames_to_latents(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))[None]


def frame_encoder(bundle: ModelBundle) -> PixelFrameEncoder:
    """The encoder of `bundle`'s input frames, or an InputError saying why it has none."""
    decoder = bundle.decoder
    if isinstance(decoder, type) and issubclass(decoder, PixelDecoder):
        return PixelFrameEncoder(bundle.stream.latent_height, bundle.stream.latent_width)
    raise InputError(f"model {bundle.name!r} takes no video input yet: video-to-video runs on models whose latents "
                     "are pixels (the embedded model); the Wan VAE's streaming encoder is not built")
