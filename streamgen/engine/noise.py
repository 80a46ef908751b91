"""Counter-based noise: every draw is a pure function of (seed, chunk/block, draw index), so the same
seed gives the same latents whatever the execution order — sequential, batched timestep slots, or
stages on other machines."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor


class NoiseSource:
    """Gaussian draws keyed by integers; CPU generator, moved to `device` after drawing."""

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.seed, self.shape, self.dtype, self.device = seed, shape, dtype, device

    def draw(self, *key: int) -> Tensor:
        digest = hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        return torch.randn(self.shape, generator=gen).to(self.device, self.dtype)

    def initial(self, chunk: int) -> Tensor:
        """Starting noise of a chunk (or rolling block)."""
        return self.draw(chunk, -1)

    def fresh(self, chunk: int, step: int) -> Tensor:
        """Re-noise draw after denoising step `step` of a chunk (or block level for rolling)."""
        return self.draw(chunk, step)
