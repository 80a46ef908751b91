"""Frame decoders: the streaming stage that turns a stream's clean latents into uint8 RGB frames.

Every decoder keeps its streaming state per instance (one per stream) and says how latent frame
indices map to video frame indices, so acknowledgements can name the video frame a change landed on.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class FrameDecoder(Protocol):
    """push(latents [B, F, C, H, W]) → frames uint8 [B, N, H', W', 3]; reset() starts a new video."""

    def push(self, latents: Tensor) -> Tensor: ...

    def reset(self) -> None: ...

    def video_frame(self, latent_frame: int) -> int: ...


def to_uint8(frames01: Tensor) -> Tensor:
    """[..., 3, H, W] floats in [0, 1] → [..., H, W, 3] uint8 (rounded)."""
    return (frames01.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1)


class LatentPreviewDecoder:
    """A fixed linear latent → RGB projection, upscaled: one frame per latent frame, no state.

    Used with random-weight models, where a trained decoder would show nothing more, and as a cheap
    preview. The projection is a fixed seeded matrix so the same latents always give the same pixels.
    """

    def __init__(self, channels: int, scale: int = 4, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3, channels, generator=gen) / channels**0.5
        self.scale = scale

    def reset(self) -> None:
        """Stateless: nothing to forget."""

    def video_frame(self, latent_frame: int) -> int:
        return latent_frame

    def push(self, latents: Tensor) -> Tensor:
        rgb = torch.einsum("oc,bfchw->bfohw", self.weight.to(latents), latents)
        rgb = torch.nn.functional.interpolate(rgb.flatten(0, 1), scale_factor=self.scale, mode="nearest")
        return to_uint8(0.5 + 0.25 * rgb.unflatten(0, latents.shape[:2]))


class WanVAEFrames:
    """Wan2.1 VAE streaming decode (exact): 1 frame for the first latent, 4 for each later one."""

    def __init__(self, vae) -> None:
        self.stream = vae.stream_decoder()

    def reset(self) -> None:
        self.stream.reset()

    def video_frame(self, latent_frame: int) -> int:
        return 0 if latent_frame == 0 else 4 * latent_frame - 3

    def push(self, latents: Tensor) -> Tensor:
        raw = self.stream.push(latents.transpose(1, 2))  # [B, 3, n, H, W] in [-1, 1] (unclamped)
        return to_uint8(raw.transpose(1, 2) * 0.5 + 0.5)


class TAEHVFrames:
    """TAEHV streaming decode (fast, approximate): same frame counts as the Wan VAE."""

    def __init__(self, taehv) -> None:
        from .taehv import TAEHVStreamDecoder

        self.stream = TAEHVStreamDecoder(taehv)

    def reset(self) -> None:
        self.stream.reset()

    def video_frame(self, latent_frame: int) -> int:
        return 0 if latent_frame == 0 else 4 * latent_frame - 3

    def push(self, latents: Tensor) -> Tensor:
        return to_uint8(self.stream.push(latents))
