"""Flow-matching noise schedule of the causal Wan models (spec §b.2).

σ ∈ [0, 1], t = 1000·σ after a shift; any timestep maps to σ by nearest entry of a 1000-entry table.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError


class FlowSchedule:
    """Shifted σ table; x_σ = (1−σ)·x0 + σ·ε and the model predicts v = ε − x0."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000) -> None:
        self.shift = shift
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        self.sigmas = shift * base / (1 + (shift - 1) * base)
        self.timesteps = self.sigmas * num_train_timesteps

    def warp(self, nominal: list[float]) -> list[float]:
        """Map nominal steps n_k (e.g. 1000, 750, 500, 250) to t_k = table[1000 − n_k] (trailing 0 appended)."""
        top = len(self.timesteps)
        bad = [n for n in nominal if not 0 < float(n) <= top]
        if bad:
            raise InputError(f"denoising steps must lie in (0, {top}], got {bad}")
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return [float(table[top - int(n)]) for n in nominal]

    def step_list(self, nominal: list[float], warp: bool = True) -> list[float]:
        if not nominal:
            raise InputError("at least one denoising step is needed")
        steps = self.warp(nominal) if warp else [float(n) for n in nominal]
        if not warp and any(not 0 <= s <= len(self.timesteps) for s in steps):
            raise InputError(f"denoising steps must lie in [0, {len(self.timesteps)}], got {steps}")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise InputError(f"denoising steps must strictly decrease, got {steps}")
        return steps

    def sigma(self, t: Tensor | float) -> Tensor:
        """Nearest-table σ for each timestep value (float32)."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).cpu()  # the table lives on the CPU
        return self.sigmas[(self.timesteps[None, :] - t[:, None]).abs().argmin(dim=1)]

    def to_x0(self, x: Tensor, flow: Tensor, t: Tensor) -> Tensor:
        """x̂0 = x − σ(t)·v̂ in float64; x, flow [B, F, C, H, W], t [B, F]."""
        sigma = self.sigma(t.flatten()).to(x.device, torch.float64).reshape(*t.shape, 1, 1, 1)
        return (x.to(torch.float64) - sigma * flow.to(torch.float64)).to(flow.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Re-noise x̂0 to the level of t (fresh noise): (1−σ)·x0 + σ·ε; t [B, F]."""
        sigma = self.sigma(t.flatten()).reshape(*t.shape, 1, 1, 1).to(x0.device)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)
