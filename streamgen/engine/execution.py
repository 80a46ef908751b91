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
from collections.abc import Generator
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

from ..cache.kv import CallSpec, KVCache
from ..models.dit import CrossKV
from ..sampling.denoiser import DiTCall, Denoiser
from ..sampling.few_step import FewStepSampler
from ..sampling.rolling import RollingSampler
from ..sampling.steps import Steps
from .noise import NoiseSource

R = TypeVar("R")
Calls = Generator[list[DiTCall], list[Tensor], R]
"""A computation as DiT calls: yields groups of independent calls, is sent their flows, returns R.
The engine loop batches the groups of many streams; `drive` runs one alone."""


def drive(denoiser: Denoiser, calls: Calls[R]) -> R:
    """Run each yielded group as one forward of `denoiser` (a stream on its own)."""
    try:
        group = next(calls)
        while True:
            group = calls.send(denoiser(group))
    except StopIteration as stop:
        return stop.value


def finished(value: R) -> Calls[R]:
    """A computation whose DiT calls ran elsewhere (Ray stages): nothing to batch here, `value` at once."""
    return value
    yield  # a generator all the same, so every execution is driven alike


def against(denoiser: Denoiser, steps: Steps[R], cross: CrossKV, cache: KVCache, drive: Tensor | None = None) -> Calls[R]:
    """A sampler's requests as single calls against one cache (each with the chunk's drive, if any)."""
    try:
        request = next(steps)
        while True:
            x, t, spec = request
            flows = yield [denoiser.call(x, t, cross, cache, spec, drive)]
            request = steps.send(flows[0])
    except StopIteration as stop:
        return stop.value


@dataclass
class ChunkInputs:
    """What the stream supplies when chunk j starts: its conditioning and its noise. Small and
    picklable (the context, not per-layer K/V), so it can travel to another worker with the latents."""

    context: Tensor
    context_id: int  # changes whenever the context does (memo key for its cross-attention K/V)
    recache_id: int  # changes only on a re-cache transition
    noise: NoiseSource
    drive: Tensor | None = None  # per-frame drive [1, F, D] of a driven (audio) stream


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


def recache(denoiser: Denoiser, cache: KVCache, recent: RecentFrames, cross: CrossKV, end_frame: int, t: float) -> Calls[None]:
    """Re-encode the cached frames before `end_frame` under a new prompt (spec §d), in place, at level t."""
    n = min(denoiser.policy.capacity_frames, end_frame, recent.frames)
    if n == 0:
        return
    denoiser.policy.prepare_recache(cache)
    x = recent.last(n)
    yield [denoiser.call(x, torch.full(x.shape[:2], t), cross, cache, CallSpec(end_frame - n, n, "recache"))]


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
    def chunk(self, inputs: Inputs) -> Calls[tuple[int, Tensor]]:
        """The DiT calls that produce the next chunk's clean latents [B, F, C, H, W]; returns (chunk index, latents)."""

    def next_chunk(self, inputs: Inputs) -> tuple[int, Tensor]:
        """The next chunk, computed alone (no other stream's calls batched with it)."""
        return drive(self.denoiser, self.chunk(inputs))

    def chunk_audio(self, chunk: int) -> Tensor | None:
        """The audio samples that drove chunk `chunk`, handed over once (audio-driven executions); else None."""
        return None


class ExactExecution(Execution):
    """Reference semantics: one cache, K steps then the clean-context rerun, chunk after chunk.
    Chunk j sits at cache frame `frame_offset` + j·F; frames before that are written by `prefill`."""

    frame_offset = 0

    def __init__(self, denoiser: Denoiser, cache: KVCache, sampler: FewStepSampler, chunk_frames: int) -> None:
        super().__init__(denoiser, [cache], chunk_frames)
        self.sampler = sampler
        self.recent = RecentFrames(denoiser.policy.capacity_frames)
        self.recache_id = 0

    def prefill(self, inp: ChunkInputs, cross: CrossKV) -> Calls[None]:
        """DiT calls that fill the cache before chunk 0 (none: a text stream starts from an empty cache)."""
        return finished(None)

    def chunk(self, inputs: Inputs) -> Calls[tuple[int, Tensor]]:
        j = self.started
        self.started += 1
        inp = inputs(j)
        start = self.frame_offset + j * self.chunk_frames
        cross = self.denoiser.cross_kv(inp.context_id, inp.context)
        if j == 0:
            yield from self.prefill(inp, cross)
        if inp.recache_id != self.recache_id:
            yield from recache(self.denoiser, self.caches[0], self.recent, cross, start, self.sampler.context_noise)
            self.recache_id = inp.recache_id
        steps = self.sampler.steps(inp.noise.initial(j), start, lambda k: inp.noise.fresh(j, k))
        x0 = yield from against(self.denoiser, steps, cross, self.caches[0], inp.drive)
        self.recent.push(x0)
        return j, x0


@dataclass
class SlotWork:
    """A chunk in flight through the timestep slots: its current latents and its inputs."""

    chunk: int
    x: Tensor
    inputs: ChunkInputs


class TimestepSlot:
    """Denoising step `step` of one stream: its own cache, built from its own (noisy) inputs, and the
    recent inputs a re-cache rebuilds it from. The unit a pipeline stage holds per stream."""

    def __init__(self, step: int, sampler: FewStepSampler, cache: KVCache, chunk_frames: int) -> None:
        self.step, self.sampler, self.cache, self.chunk_frames = step, sampler, cache, chunk_frames
        self.recent = RecentFrames(cache.capacity_frames)
        self.recache_id = 0

    @property
    def last(self) -> bool:
        return self.step + 1 == len(self.sampler.timesteps)

    def call(self, denoiser: Denoiser, work: SlotWork) -> Calls[DiTCall]:
        """The DiT call of this step for `work` (after the re-cache calls, if the prompt was re-cached)."""
        cross = denoiser.cross_kv(work.inputs.context_id, work.inputs.context)
        start = work.chunk * self.chunk_frames
        t = self.sampler.timesteps[self.step]
        if work.inputs.recache_id != self.recache_id:
            yield from recache(denoiser, self.cache, self.recent, cross, start, t)
            self.recache_id = work.inputs.recache_id
        self.recent.push(work.x)
        return denoiser.call(work.x, torch.full(work.x.shape[:2], t), cross, self.cache, CallSpec(start, work.x.shape[1]))

    def advance(self, work: SlotWork, call: DiTCall, flow: Tensor) -> SlotWork:
        """x̂0 from the flow; re-noised to the next step's level unless this is the last step."""
        x0 = self.sampler.schedule.to_x0(work.x, flow, call.t)
        if self.last:
            return SlotWork(work.chunk, x0, work.inputs)
        t_next = torch.full(call.t.shape, self.sampler.timesteps[self.step + 1])
        return SlotWork(work.chunk, self.sampler.schedule.add_noise(x0, work.inputs.noise.fresh(work.chunk, self.step), t_next), work.inputs)


def slot_tick(denoiser: Denoiser, slots: list[TimestepSlot], works: list[SlotWork], batched: bool) -> Calls[list[SlotWork]]:
    """One tick: each slot advances its work by one step; batched = one group for all of them."""
    calls = []
    for slot, work in zip(slots, works):
        calls.append((yield from slot.call(denoiser, work)))
    if batched:
        flows = yield calls
    else:
        flows = []
        for call in calls:
            flows += (yield [call])
    return [slot.advance(work, call, flow) for slot, work, call, flow in zip(slots, works, calls, flows)]


def run_slots(denoiser: Denoiser, slots: list[TimestepSlot], works: list[SlotWork], batched: bool) -> list[SlotWork]:
    """`slot_tick` run alone."""
    return drive(denoiser, slot_tick(denoiser, slots, works, batched))


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
        self.slots = [TimestepSlot(k, sampler, cache, chunk_frames) for k, cache in enumerate(caches)]
        self.sampler = sampler
        self.batched = batched
        self.in_flight: list[SlotWork | None] = [None] * len(caches)

    def chunk(self, inputs: Inputs) -> Calls[tuple[int, Tensor]]:
        while True:
            if self.batched or not any(self.in_flight):
                j = self.started
                self.started += 1
                inp = inputs(j)
                self.in_flight[0] = SlotWork(j, inp.noise.initial(j), inp)
            active = [k for k, w in enumerate(self.in_flight) if w is not None]
            done = yield from slot_tick(self.denoiser, [self.slots[k] for k in active], [self.in_flight[k] for k in active],
                                        self.batched)
            self.in_flight = [None] * len(self.slots)
            for k, work in zip(active, done):
                if self.slots[k].last:
                    finished = work
                else:
                    self.in_flight[k + 1] = work
            if self.slots[-1].step in active:
                return finished.chunk, finished.x


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

    def chunk(self, inputs: Inputs) -> Calls[tuple[int, Tensor]]:
        while self.emitted not in self.done:
            _, last = self.sampler.window_span(self.window, None)
            if last not in self.block_inputs:
                self.block_inputs[last] = inputs(last)
                self.started += 1
            inp = self.block_inputs[last]  # the window is conditioned like its newest block
            cross = self.denoiser.cross_kv(inp.context_id, inp.context)
            steps = self.sampler.window_steps(self.window, self.noisy, lambda b: self.block_inputs[b].noise.initial(b),
                                              lambda w, b, lv: inp.noise.fresh(b, lv))
            self.done.update((yield from against(self.denoiser, steps, cross, self.caches[0])))
            self.window += 1
        j = self.emitted
        self.emitted += 1
        self.block_inputs.pop(j - self.sampler.window_blocks, None)
        return j, self.done.pop(j)
