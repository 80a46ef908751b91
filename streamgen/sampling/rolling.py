"""Rolling Forcing's rolling-window joint denoising (spec §c.2).

A window of up to `window_blocks` blocks is denoised in one DiT call with noise levels rising toward
the newest block; each block moves one level per window and leaves the window clean. After every
window the oldest block is rerun at t = context_noise to put its clean K/V in the cache.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..cache.kv import CallSpec
from .steps import Flow, Steps, run_with
from .schedule import FlowSchedule

BlockNoise = Callable[[int], Tensor]  # block -> initial noise [B, F, C, H, W]
LevelNoise = Callable[[int, int, int], Tensor]  # (window, block, next level index) -> fresh noise
WindowObserver = Callable[[int, Tensor, Tensor, Tensor], None]  # (window, input, t, x0)


class RollingSampler:
    """Emits one clean block per window once the pipeline is full; `num_blocks` None = endless."""

    def __init__(self, schedule: FlowSchedule, timesteps: list[float], block_frames: int = 3,
                 window_blocks: int | None = None, context_noise: float = 0.0) -> None:
        self.schedule = schedule
        self.timesteps = timesteps  # descending; block levels run from timesteps[0] down to timesteps[-1]
        self.block_frames = block_frames
        self.window_blocks = window_blocks or len(timesteps)
        if self.window_blocks != len(timesteps):
            raise ValueError(f"a rolling window of {self.window_blocks} blocks needs as many steps, got {len(timesteps)}")
        self.context_noise = context_noise

    def window_span(self, w: int, num_blocks: int | None) -> tuple[int, int]:
        last = w if num_blocks is None else min(num_blocks - 1, w)
        return max(0, w - self.window_blocks + 1), last

    def levels(self, first: int, last: int, num_blocks: int | None) -> list[int]:
        """Step index per block, oldest first: full [K-1, …, 0]; warm-up its last n; tail its first n."""
        full = list(range(len(self.timesteps) - 1, -1, -1))
        n = last - first + 1
        tail = num_blocks is not None and last == num_blocks - 1 and first > 0 and n < self.window_blocks
        return full[:n] if tail else full[-n:]

    def window(self, flow: Flow, w: int, noisy: dict[int, Tensor], block_noise: BlockNoise, fresh: LevelNoise,
               num_blocks: int | None = None, observe: WindowObserver | None = None) -> dict[int, Tensor]:
        """Run window w; updates `noisy` in place and returns the blocks that became clean {block: x0}."""
        return run_with(flow, self.window_steps(w, noisy, block_noise, fresh, num_blocks, observe))

    def window_steps(self, w: int, noisy: dict[int, Tensor], block_noise: BlockNoise, fresh: LevelNoise,
                     num_blocks: int | None = None, observe: WindowObserver | None = None) -> Steps[dict[int, Tensor]]:
        """The DiT requests of window w (the joint call, then the oldest block's clean rerun)."""
        first, last = self.window_span(w, num_blocks)
        levels = self.levels(first, last, num_blocks)
        x = torch.cat([noisy.pop(b) if b in noisy else block_noise(b) for b in range(first, last + 1)], dim=1)
        f = self.block_frames
        t = torch.tensor([self.timesteps[lv] for lv in levels], dtype=torch.float32).repeat_interleave(f)[None].expand(x.shape[0], -1)
        x0 = self.schedule.to_x0(x, (yield x, t, CallSpec(first * f, x.shape[1])), t)
        if observe:
            observe(w, x, t, x0)
        done: dict[int, Tensor] = {}
        for i, (b, lv) in enumerate(zip(range(first, last + 1), levels)):
            xb = x0[:, i * f:(i + 1) * f]
            if lv + 1 == len(self.timesteps):
                done[b] = xb
            else:
                tb = torch.full(xb.shape[:2], self.timesteps[lv + 1])
                noisy[b] = self.schedule.add_noise(xb, fresh(w, b, lv + 1), tb)
        head = x0[:, :f]
        yield head, torch.full(head.shape[:2], self.context_noise), CallSpec(first * f, f, "rerun")
        return done
