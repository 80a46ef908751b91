"""LiveAvatar's block sampler (spec/avatar.md §2.6–2.7, the live_avatar fixture's meta.json: semantics): the caches
the causal S2V DiT streams with and the loop that denoises one block against them.

- One `StepRing` per denoising step index: at step i a block writes its own noisy (t_i), roped keys into ring i
  and attends to that ring's filled part; there is no clean t = 0 re-encode (so step i could live on its own
  device, TPP).
- One `CondCache` shared by the rings: the reference + FramePack motion keys, prefilled once at t = 0
  (`prefill`, again after a sink swap), stored un-roped and re-roped on every call with the reference moved
  by the rolling-sink offset of that call (`ref_shift` of the call's `rd` draw).
- Per block: x ← x + (σ_{i+1} − σ_i)·v for i = 0..steps−1 in fp32, σ from diffusers'
  `FlowMatchEulerDiscreteScheduler(shift)` with `set_timesteps(steps)` (`EulerSchedule.flow_match`).

This is the one definition of that loop: the fixture runner (`parity/live_avatar.py`) and the audio-driven
stream (`engine/avatar_stream.py`) both call it. Where the `rd` draws come from is the caller's business
(`RecordedSinkDraws` replays the fixture's; the stream draws them from its seed).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..models.s2v import CondCache, S2VConfig, S2VDiT, StepRing, StreamAttention, ref_shift
from ..models.s2v.audio import AudioTokens

Observer = Callable[[str, Tensor], None]
StepHook = Callable[[int, Tensor, Tensor], None]  # (step, x before the step, flow)


@dataclass(frozen=True)
class EulerSchedule:
    """The per-block Euler schedule: `timesteps` [steps] fed to the DiT, `sigmas` [steps + 1] (trailing 0)."""

    timesteps: Tensor
    sigmas: Tensor

    @classmethod
    def flow_match(cls, steps: int = 4, shift: float = 3.0, num_train_timesteps: int = 1000) -> EulerSchedule:
        """diffusers 0.31 `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)` after
        `set_timesteps(steps)`, as LiveAvatar rebuilds it for every block (the shift is applied to the table's
        σ_min and again to the step σs; shift 3, 4 steps: t = 1000, 857.69, 602.15, 8.93)."""
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        n = num_train_timesteps
        table = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        table = shift * table / (1 + (shift - 1) * table)
        sigma_max, sigma_min = table[0].item(), table[-1].item()
        sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
        sigmas = torch.from_numpy(shift * sigmas / (1 + (shift - 1) * sigmas)).to(torch.float32)
        return cls(sigmas * n, torch.cat([sigmas, torch.zeros(1)]))

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def cond_token_count(cfg: S2VConfig, latent_height: int, latent_width: int) -> int:
    """Tokens of the cond sequence: the reference (patch 1×2×2) + FramePack's 1x / 2x / 4x motion tokens."""
    h, w = latent_height, latent_width
    ref = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    return ref + sum((b // c) * (h // (2 * c)) * (w // (2 * c)) for b, c in zip(cfg.zip_frame_buckets, (1, 2, 4)))


class RecordedSinkDraws:
    """Replays recorded rolling-sink draws, block-major, step-minor (the fixture's `rope_rd_draws`)."""

    def __init__(self, draws: Sequence[int], steps: int) -> None:
        self.draws, self.steps = [int(d) for d in draws], steps

    def __call__(self, block: int, step: int) -> int:
        i = self.steps * block + step
        if i >= len(self.draws):
            raise IndexError(f"recorded sink draws cover {len(self.draws) // self.steps} blocks of {self.steps} "
                             f"steps; block {block} step {step} needs draw {i}")
        return self.draws[i]


class S2VBlockSampler:
    """The caches of one LiveAvatar stream (a ring per step, the shared cond cache) and its block loop."""

    def __init__(self, model: S2VDiT, schedule: EulerSchedule, *, ring_tokens: int, cond_tokens: int,
                 chunk_frames: int = 3, batch: int = 1, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        param = next(model.parameters())
        dtype, device = dtype or param.dtype, device or param.device
        m = model.cfg
        self.model, self.schedule, self.chunk_frames = model, schedule, chunk_frames
        heads = (m.num_heads, m.head_dim)
        self.cond = CondCache.allocate(m.num_layers, batch, cond_tokens, *heads, dtype=dtype, device=device)
        self.rings = [StepRing.allocate(m.num_layers, batch, ring_tokens, *heads, dtype=dtype, device=device)
                      for _ in range(schedule.steps)]

    @property
    def cache_bytes(self) -> int:
        bufs = [t for c in (self.cond, *self.rings) for t in (*c.k, *c.v)]
        return sum(t.numel() * t.element_size() for t in bufs)

    def prefill(self, ref: Tensor, motion: Tensor, cross) -> None:
        """The sink prefill at t = 0 (overwrites the cond cache; the rings are untouched). The reference runs it
        once per step cache with identical inputs; the cache is shared, so once is the same."""
        self.model.prefill(ref, motion, cross, self.cond)

    def block(self, x: Tensor, block: int, pose: Tensor, audio: AudioTokens, cross, draws: Sequence[int],
              on_step: StepHook | None = None, observe: Callable[[int], Observer | None] | None = None) -> Tensor:
        """Denoise block `block` (latent frames chunk_frames·block ..) from noise x [B, C, F, H, W]; `draws` are
        its rd per step. Returns the clean block. `on_step(i, x, flow)` and `observe(i)` (a per-call observer
        or None) are for the fixture runner's step outputs and debug tensors."""
        m, sched = self.model.cfg, self.schedule
        if len(draws) != sched.steps:
            raise ValueError(f"block {block}: {len(draws)} sink draws for {sched.steps} steps")
        start = self.chunk_frames * block
        for i in range(sched.steps):
            attn = StreamAttention(self.model.rope, self.rings[i], self.cond, start,
                                   ref_shift(start, int(draws[i]), m.ref_rope_frame))
            t = sched.timesteps[i].to(x.device).expand(x.shape[0], x.shape[2])
            flow = self.model(x, t, pose, audio, cross, attn, observe(i) if observe else None)
            if on_step:
                on_step(i, x, flow)
            x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * flow
        return x
