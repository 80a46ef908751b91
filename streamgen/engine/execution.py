"""How one stream's chunks are executed against its caches — the three schedules:

- `exact`: the reference semantics. One cache; each chunk is denoised step by step, then rerun clean.
- `timestep-slot`: denoising step k of every chunk has its own cache built from its own inputs
  (Live Avatar's timestep forcing), so the steps of consecutive chunks are independent: they run as
  one batch per tick (stream batch) or, in the Ray backend, on separate stages.
- `rolling`: Rolling Forcing's window of blocks at rising noise levels over one cache.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..cache.kv import CallSpec, KVCache
from ..models.dit import CrossKV
from ..sampling.denoiser import DiTCall, Denoiser
from ..sampling.few_step import FewStepSampler
from ..sampling.rolling import RollingSampler
from .noise import NoiseSource


@dataclass
class ChunkInputs:
    """What the stream supplies when chunk j starts: its conditioning and its noise."""

    cross: CrossKV
    recache_id: int
    noise: NoiseSource


Inputs = Callable[[int], ChunkInputs]


class RecentFrames:
    """The last `capacity` latent frames (bounded), kept so K/V can be rebuilt by a re-cache pass."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: deque[Tensor] = deque()
        self.frames = 0

    def push(self, x: Tensor) -> None:
        self.chunks.append(x)
        self.frames += x.shape[1]
        while self.frames - self.chunks[0].shape[1] >= self.capacity:
            self.frames -= self.chunks.popleft().shape[1]

    def last(self, n: int) -> Tensor:
        return torch.cat(list(self.chunks), dim=1)[:, -n:]


class Execution(ABC):
    """Per-stream execution state: caches, chunk counter, in-flight work."""

    def __init__(self, denoiser: Denoiser, caches: list[KVCache], chunk_frames: int) -> None:
        self.denoiser = denoiser
        self.caches = caches
        self.chunk_frames = chunk_frames
        self.started = 0  # chunks whose inputs were taken

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    @abstractmethod
    def next_chunk(self, inputs: Inputs) -> tuple[int, Tensor]:
        """Produce the next chunk's clean latents [B, F, C, H, W]; returns (chunk index, latents)."""

    def _recache(self, cache: KVCache, recent: RecentFrames, cross: CrossKV, end_frame: int, t: float) -> None:
        """Re-encode the cached frames before `end_frame` under a new prompt (spec §d), in place."""
        n = min(self.denoiser.policy.capacity_frames, end_frame, recent.frames)
        if n == 0:
            return
        self.denoiser.policy.prepare_recache(cache)
        x = recent.last(n)
        self.denoiser.one(x, torch.full(x.shape[:2], t), cross, cache, CallSpec(end_frame - n, n, "recache"))


class ExactExecution(Execution):
    """Reference semantics: one cache, K steps then the clean-context rerun, chunk after chunk."""

    def __init__(self, denoiser: Denoiser, cache: KVCache, sampler: FewStepSampler, chunk_frames: int) -> None:
        super().__init__(denoiser, [cache], chunk_frames)
        self.sampler = sampler
        self.recent = RecentFrames(denoiser.policy.capacity_frames)
        self.recache_id = 0

    def next_chunk(self, inputs: Inputs) -> tuple[int, Tensor]:
        j = self.started
        self.started += 1
        inp = inputs(j)
        start = j * self.chunk_frames
        if inp.recache_id != self.recache_id:
            self._recache(self.caches[0], self.recent, inp.cross, start, self.sampler.context_noise)
            self.recache_id = inp.recache_id
        flow = lambda x, t, call: self.denoiser.one(x, t, inp.cross, self.caches[0], call)  # noqa: E731
        x0 = self.sampler.sample(flow, inp.noise.initial(j), start, lambda k: inp.noise.fresh(j, k))
        self.recent.push(x0)
        return j, x0


@dataclass
class SlotWork:
    """A chunk in flight through the timestep slots."""

    chunk: int
    x: Tensor
    inputs: ChunkInputs


class TimestepSlotExecution(Execution):
    """Step k of every chunk runs against slot k's cache, filled from slot k's own (noisy) inputs.

    batched=True runs the occupied slots of each tick as one forward (chunk j at step k next to
    chunk j+1 at step k−1); batched=False runs a chunk through all slots before the next. Both
    give the same latents; a re-cache is done per slot from that slot's own recent inputs.
    """

    def __init__(self, denoiser: Denoiser, caches: list[KVCache], sampler: FewStepSampler, chunk_frames: int,
                 batched: bool = True) -> None:
        super().__init__(denoiser, caches, chunk_frames)
        if len(caches) != len(sampler.timesteps):
            raise ValueError(f"{len(sampler.timesteps)} steps need as many slot caches, got {len(caches)}")
        self.sampler = sampler
        self.batched = batched
        self.recent = [RecentFrames(denoiser.policy.capacity_frames) for _ in caches]
        self.recache_ids = [0] * len(caches)
        self.in_flight: list[SlotWork | None] = [None] * len(caches)

    def next_chunk(self, inputs: Inputs) -> tuple[int, Tensor]:
        while True:
            if not self.batched and any(self.in_flight):
                done = self._tick()
            else:
                j = self.started
                self.started += 1
                self.in_flight[0] = SlotWork(j, inputs(j).noise.initial(j), inputs(j))
                done = self._tick()
            if done is not None:
                return done

    def _tick(self) -> tuple[int, Tensor] | None:
        """Advance every chunk in flight by one step; returns the chunk that finished, if any."""
        active = [(k, w) for k, w in enumerate(self.in_flight) if w is not None]
        for k, w in active:
            if w.inputs.recache_id != self.recache_ids[k]:
                self._recache(self.caches[k], self.recent[k], w.inputs.cross, w.chunk * self.chunk_frames, self.sampler.timesteps[k])
                self.recache_ids[k] = w.inputs.recache_id
        calls = [self._call(k, w) for k, w in active]
        groups = [calls] if self.batched else [[c] for c in calls]
        flows = [f for group in groups for f in self.denoiser(group)]
        finished = None
        shifted: list[SlotWork | None] = [None] * len(self.caches)
        for (k, w), call, flow in zip(active, calls, flows):
            self.recent[k].push(w.x)
            x0 = self.sampler.schedule.to_x0(w.x, flow, call.t)
            if k + 1 == len(self.caches):
                finished = (w.chunk, x0)
            else:
                t_next = torch.full(call.t.shape, self.sampler.timesteps[k + 1])
                shifted[k + 1] = SlotWork(w.chunk, self.sampler.schedule.add_noise(x0, w.inputs.noise.fresh(w.chunk, k), t_next), w.inputs)
        self.in_flight = shifted
        return finished

    def _call(self, k: int, w: SlotWork) -> DiTCall:
        t = torch.full(w.x.shape[:2], self.sampler.timesteps[k])
        return DiTCall(w.x, t, w.inputs.cross, self.caches[k], CallSpec(w.chunk * self.chunk_frames, w.x.shape[1]))


class RollingExecution(Execution):
    """Rolling Forcing, endless: after the warm-up windows every window emits one clean block."""

    def __init__(self, denoiser: Denoiser, cache: KVCache, sampler: RollingSampler) -> None:
        super().__init__(denoiser, [cache], sampler.block_frames)
        self.sampler = sampler
        self.window = 0
        self.noisy: dict[int, Tensor] = {}
        self.done: dict[int, Tensor] = {}
        self.emitted = 0
        self.block_inputs: dict[int, ChunkInputs] = {}

    def next_chunk(self, inputs: Inputs) -> tuple[int, Tensor]:
        while self.emitted not in self.done:
            _, last = self.sampler.window_span(self.window, None)
            if last not in self.block_inputs:
                self.block_inputs[last] = inputs(last)
                self.started += 1
            inp = self.block_inputs[last]  # the window is conditioned like its newest block
            flow = lambda x, t, call: self.denoiser.one(x, t, inp.cross, self.caches[0], call)  # noqa: E731
            self.done.update(self.sampler.window(flow, self.window, self.noisy, lambda b: self.block_inputs[b].noise.initial(b),
                                                 lambda w, b, lv: inp.noise.fresh(b, lv)))
            self.window += 1
        j = self.emitted
        self.emitted += 1
        self.block_inputs.pop(j - self.sampler.window_blocks, None)
        return j, self.done.pop(j)
