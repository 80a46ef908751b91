"""Counter-based noise: every draw is a pure function of (seed, chunk/block, draw index), so the same
seed gives the same latents whatever the execution order — sequential, batched timestep slots, or
stages on other machines."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rng import keyed_randn


class NoiseSource:
    """Gaussian draws keyed by integers; CPU generator, moved to `device` after drawing."""

    def __init__(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.seed, self.shape, self.dtype, self.device = seed, shape, dtype, device

    def draw(self, *key: int) -> Tensor:
        return keyed_randn(self.shape, self.seed, *key).to(self.device, self.dtype)

    def initial(self, chunk: int) -> Tensor:
        """Starting noise of a chunk (or rolling block)."""
        return self.draw(chunk, -1)

    def fresh(self, chunk: int, step: int) -> Tensor:
        """Re-noise draw after denoising step `step` of a chunk (or block level for rolling)."""
        return self.draw(chunk, step)
