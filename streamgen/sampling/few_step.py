"""Few-step "predict x̂0, re-noise with fresh noise" sampler of one chunk (spec §b.3) and the
clean-context rerun (§b.4) that replaces the chunk's noisy cache entries with clean ones."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..cache.kv import CallSpec
from .schedule import FlowSchedule
from .steps import Flow, Steps, run_with

FreshNoise = Callable[[int], Tensor]  # step k -> noise for re-noising after step k
StepObserver = Callable[[int, Tensor, Tensor, Tensor], None]  # (k, x, flow, x0)


class FewStepSampler:
    """Denoises one chunk in len(timesteps) DiT calls, then reruns it at t = context_noise."""

    def __init__(self, schedule: FlowSchedule, timesteps: list[float], context_noise: float = 0.0, rerun: bool = True) -> None:
        self.schedule = schedule
        self.timesteps = timesteps
        self.context_noise = context_noise
        self.rerun = rerun

    def step(self, x: Tensor, k: int, start_frame: int, fresh_noise: FreshNoise,
             observe: StepObserver | None = None) -> Steps[tuple[Tensor, Tensor]]:
        """Step k: returns (x̂0, input of step k+1 — or x̂0 itself after the last step)."""
        b, f = x.shape[:2]
        t = torch.full((b, f), self.timesteps[k])
        v = yield x, t, CallSpec(start_frame, f)
        x0 = self.schedule.to_x0(x, v, t)
        if observe:
            observe(k, x, v, x0)
        if k + 1 == len(self.timesteps):
            return x0, x0
        return x0, self.schedule.add_noise(x0, fresh_noise(k), torch.full((b, f), self.timesteps[k + 1]))

    def steps(self, noise: Tensor, start_frame: int, fresh_noise: FreshNoise,
              observe: StepObserver | None = None) -> Steps[Tensor]:
        """Every DiT request of one chunk (the denoising steps, then the clean rerun); returns x̂0."""
        x = noise
        for k in range(len(self.timesteps)):
            x0, x = yield from self.step(x, k, start_frame, fresh_noise, observe)
        if self.rerun:
            b, f = x0.shape[:2]
            yield x0, torch.full((b, f), self.context_noise), CallSpec(start_frame, f, "rerun")
        return x0

    def sample(self, flow: Flow, noise: Tensor, start_frame: int, fresh_noise: FreshNoise,
               observe: StepObserver | None = None) -> Tensor:
        return run_with(flow, self.steps(noise, start_frame, fresh_noise, observe))
