"""Flow matching with per-chunk noise levels (Diffusion Forcing) and the masked denoising loss.

x_σ = (1 − σ)·x0 + σ·ε, target v = ε − x0 (spec §b.2). Levels come from the shifted 1000-entry
table the sampler uses (uniform index → σ concentrated at high noise for shift 5), and with some
probability exactly the sampler's own timesteps. Context chunks sit at t = 0, the clean rerun level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling.schedule import FlowSchedule


@dataclass
class Levels:
    """Per-chunk timesteps t [B, chunks] (0 = clean context) and which chunks are denoised [B, chunks]."""

    t: Tensor
    noisy: Tensor


def sample_levels(schedule: FlowSchedule, sampler_steps: list[float], batch: int, chunks: int,
                  gen: torch.Generator, clean_prefix: Tensor, sampler_step_prob: float) -> Levels:
    """Independent level per chunk; chunks c < clean_prefix[b] are clean context (t = 0)."""
    idx = torch.randint(0, len(schedule.timesteps), (batch, chunks), generator=gen)
    t = schedule.timesteps[idx]
    pick = torch.rand(batch, chunks, generator=gen) < sampler_step_prob
    steps = torch.tensor(sampler_steps, dtype=t.dtype)
    t = torch.where(pick, steps[torch.randint(0, len(sampler_steps), (batch, chunks), generator=gen)], t)
    noisy = torch.arange(chunks)[None, :] >= clean_prefix[:, None]
    return Levels(torch.where(noisy, t, torch.zeros_like(t)), noisy)


def clean_prefixes(batch: int, chunks: int, gen: torch.Generator, df_prob: float) -> Tensor:
    """Diffusion Forcing (all chunks noisy) with probability df_prob, else teacher forcing: a clean
    prefix of 1…chunks−1 chunks (the inference situation: clean context, noisy newest chunk)."""
    prefix = torch.randint(1, chunks, (batch,), generator=gen) if chunks > 1 else torch.zeros(batch, dtype=torch.long)
    return torch.where(torch.rand(batch, generator=gen) < df_prob, torch.zeros_like(prefix), prefix)


def noisy_inputs(schedule: FlowSchedule, x0: Tensor, t_chunks: Tensor, chunk_frames: int,
                 gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_σ, per-frame t [B, F], target v) for latents x0 [B, F, C, H, W] and per-chunk t [B, chunks]."""
    t = t_chunks.repeat_interleave(chunk_frames, dim=1)
    sigma = schedule.sigma(t.flatten()).reshape(*t.shape, 1, 1, 1)
    sigma = torch.where(t[..., None, None, None] == 0, torch.zeros_like(sigma), sigma)
    noise = torch.randn(x0.shape, generator=gen)
    return (1 - sigma) * x0 + sigma * noise, t, noise - x0


def masked_loss(pred: Tensor, target: Tensor, weight: Tensor, chunk_frames: int) -> Tensor:
    """Weighted mean squared error over chunks: weight [B, chunks] (0 = no loss), normalised by the
    number of chunks with a loss, so a weight below 1 lowers that chunk's share."""
    err = (pred.float() - target.float()).pow(2).mean(dim=(2, 3, 4))                 # [B, F]
    err = err.unflatten(1, (-1, chunk_frames)).mean(-1)                              # [B, chunks]
    w = weight.to(err.dtype)
    return (err * w).sum() / (w > 0).sum().clamp_min(1)
