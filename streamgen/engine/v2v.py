"""Live video-to-video (StreamDiffusionV2 and Scope, spec A3/A6/A7): each chunk starts from its input
frames noised to a strength instead of from pure noise, and is denoised by the stream's own DiT, cache
policy and few-step sampler with the prompt as condition.

- The input enters only as the chunk's starting latents: z = encode(frames), x = s·ε + (1 − s)·z, where
  ε is the stream's counter-based draw for that chunk (`NoiseSource.initial`), so the same seed and the
  same frames give the same latents, in any execution order.
- Steps: the model is told t0 = round(1000·s) − offset at the first step, then the stream's own steps
  below t0: with (1000, 750, 500, 250) and s = 0.75, (750, 500, 250). SDV2 and Scope use offset 100
  (the model is told a level 0.1 below what was applied, tuned to their checkpoint; spec F1); the
  default here is 0. Cutting the list below t0, rather than overwriting its first entry as SDV2 does,
  keeps it strictly decreasing (Scope's LongLive video mode otherwise gives [600, 750]).
- The cache holds each output chunk's clean rerun (Scope's `CleanKVCacheBlock`; the few-step sampler's
  rerun at `context_noise`), exactly as in text-to-video.
- Frames: a `FrameFeed` gives chunk j its frames when chunk j starts, and never waits: a live feed
  samples a backlog uniformly (Scope: stay live, drop frames) and repeats the last frame when the camera
  is slower than the model.

Wired in through the stream's execution seam (`use_video`): the exact schedule only.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..sampling.few_step import FewStepSampler
from ..sampling.schedule import FlowSchedule
from .execution import Calls, ChunkInputs, ExactExecution, Inputs
from .noise import NoiseSource

if TYPE_CHECKING:
    from .stream import Stream

DEFAULT_STRENGTH = 0.75  # the embedded model's (1000, 750, 500, 250) → (750, 500, 250) from the input
TRAIN_TIMESTEPS = 1000


class FrameFeed(Protocol):
    """Where a V2V stream's input frames come from."""

    def take(self, chunk: int, count: int) -> np.ndarray:
        """`count` frames uint8 [count, H, W, 3] at the model's frame size for chunk `chunk`; never blocks."""


class FrameEncoder(Protocol):
    """Frames → latents of one model (the embedded model: exact pixel latents)."""

    height: int
    width: int

    def frames_for(self, latent_frames: int) -> int:
        """Input frames a chunk of `latent_frames` latent frames needs."""

    def encode(self, frames: np.ndarray) -> Tensor:
        """uint8 [N, H, W, 3] → latents [1, F, C, h, w]."""


def v2v_steps(timesteps: list[float], strength: float, offset: float = 0.0) -> list[float]:
    """The step list of a chunk that starts from its input noised to σ = strength: the model is told
    t0 = round(1000·strength) − offset first, then every step of `timesteps` below t0."""
    check_strength(strength, offset)
    t0 = float(round(TRAIN_TIMESTEPS * strength)) - offset
    return [t0] + [float(t) for t in timesteps if t < t0]


def check_strength(strength: float, offset: float = 0.0) -> None:
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 < strength <= 1):
        raise InputError(f"strength must lie in (0, 1] (1: pure noise, the input ignored), got {strength!r}")
    if not round(TRAIN_TIMESTEPS * strength) - offset > 0:
        raise InputError(f"strength {strength} with a first-step offset of {offset:g} leaves no timestep above 0")


class InputStrengthSampler(FewStepSampler):
    """The stream's few-step sampler (same steps, re-noising and clean rerun), its step list starting at
    the input's noise level. Setting `timesteps` (a `params` change of `steps`) cuts the new list the same way."""

    def __init__(self, schedule: FlowSchedule, timesteps: list[float], context_noise: float, strength: float,
                 offset: float = 0.0) -> None:
        self.strength, self.offset = strength, offset
        super().__init__(schedule, timesteps, context_noise)

    @property
    def timesteps(self) -> list[float]:
        return self._timesteps

    @timesteps.setter
    def timesteps(self, value: list[float]) -> None:
        self.stream_timesteps = list(value)
        self._timesteps = v2v_steps(self.stream_timesteps, self.strength, self.offset)


class InputNoise:
    """A chunk's noise source with its starting latents replaced by the input mixed with ε:
    x = s·ε + (1 − s)·z (the linear rectified-flow mix of SDV2's `_encode_noisy_latents`); the re-noising
    draws are the stream's own."""

    def __init__(self, noise: NoiseSource, latents: Tensor, chunk: int, strength: float) -> None:
        self.noise, self.latents, self.chunk, self.strength = noise, latents, chunk, strength
        self.seed, self.shape, self.dtype, self.device = noise.seed, noise.shape, noise.dtype, noise.device

    def initial(self, chunk: int) -> Tensor:
        if chunk != self.chunk:
            raise ValueError(f"input latents of chunk {self.chunk} asked for chunk {chunk}")
        eps = self.noise.initial(chunk)
        s = self.strength
        return (s * eps.to(torch.float64) + (1 - s) * self.latents.to(eps.device, torch.float64)).to(eps.dtype)

    def fresh(self, chunk: int, step: int) -> Tensor:
        return self.noise.fresh(chunk, step)

    def draw(self, *key: int) -> Tensor:
        return self.noise.draw(*key)


class V2VExecution(ExactExecution):
    """Exact execution whose chunks start from their input frames (see the module docstring)."""

    def __init__(self, stream: Stream, feed: FrameFeed, encoder: FrameEncoder, strength: float = DEFAULT_STRENGTH,
                 offset: float = 0.0) -> None:
        cfg = stream.config
        sampler = InputStrengthSampler(stream.schedule, stream.timesteps, cfg.context_noise, strength, offset)
        super().__init__(stream.denoiser, stream.allocate_cache(), sampler, cfg.chunk_frames)
        self.feed, self.encoder = feed, encoder
        self.last_input: Tensor | None = None  # the latest chunk's input latents (before noising)

    @property
    def strength(self) -> float:
        return self.sampler.strength

    def chunk(self, inputs: Inputs) -> Calls[tuple[int, Tensor]]:
        return (yield from super().chunk(lambda j: self._with_video(j, inputs(j))))

    def _with_video(self, j: int, inp: ChunkInputs) -> ChunkInputs:
        """Chunk j's inputs (controls applied first) with its frames, taken now, as the starting latents."""
        frames = self.feed.take(j, self.encoder.frames_for(self.chunk_frames))
        z = self.encoder.encode(frames)
        if tuple(z.shape) != tuple(inp.noise.shape):
            raise ValueError(f"input latents {tuple(z.shape)} do not match the stream's chunk {tuple(inp.noise.shape)}")
        self.last_input = z
        return replace(inp, noise=InputNoise(inp.noise, z, j, self.strength))


def use_video(stream: Stream, feed: FrameFeed, encoder: FrameEncoder, strength: float = DEFAULT_STRENGTH,
              offset: float = 0.0) -> V2VExecution:
    """Make `stream` a V2V stream (before its first chunk): its execution, and the one a reset builds,
    take their starting latents from `feed` through `encoder`."""
    cfg = stream.config
    if cfg.sampler != "few_step" or cfg.schedule != "exact":
        raise InputError(f"video input runs with sampler 'few_step' and schedule 'exact' (this stream: {cfg.sampler}, "
                         f"{cfg.schedule})")
    probe = encoder.encode(np.zeros((encoder.frames_for(cfg.chunk_frames), encoder.height, encoder.width, 3), np.uint8))
    if tuple(probe.shape) != tuple(stream.noise.shape):
        raise InputError(f"the frame encoder makes chunks of latents {tuple(probe.shape)}, the stream needs "
                         f"{tuple(stream.noise.shape)}")
    if stream.execution.started:
        raise InputError("video input is set before a stream's first chunk")
    v2v_steps(stream.timesteps, strength, offset)  # refuses a bad strength here
    stream.execution_factory = lambda s: V2VExecution(s, feed, encoder, strength, offset)
    stream.execution = stream.execution_factory(stream)
    return stream.execution


# --- feeds -----------------------------------------------------------------------------------------------

class FrameList:
    """A fixed sequence of frames (a file, a test): chunk j gets frames j·n … j·n + n − 1, the last frame
    repeated past the end. Deterministic; a reset starts from the first frame again."""

    def __init__(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"frames must be uint8 [N, H, W, 3] with N ≥ 1, got {frames.dtype} {frames.shape}")
        self.frames = frames

    def take(self, chunk: int, count: int) -> np.ndarray:
        index = np.minimum(np.arange(chunk * count, chunk * count + count), len(self.frames) - 1)
        return self.frames[index]


class LiveFrames:
    """The bounded input buffer of a live source (a camera track): `push` from the receiving
    side (any thread), `take` when a chunk starts (the engine's thread), which never waits.

    A chunk gets `count` frames sampled uniformly from what arrived since the previous chunk, ending at
    the newest (Scope's drop policy: the model stays live); when fewer arrived (the camera is slower than
    the model), those and then the last frame repeated; before any frame arrived, `fill` frames (black:
    the world's background). Arrivals beyond `capacity` push out the oldest (counted as skipped)."""

    def __init__(self, height: int, width: int, capacity: int = 64, fill: int = 0) -> None:
        self.height, self.width = height, width
        self._arrived: deque[np.ndarray] = deque()
        self._capacity = capacity
        self._last: np.ndarray | None = None
        self._fill = np.full((height, width, 3), fill, np.uint8)
        self._lock = threading.Lock()
        self.first_at: float | None = None  # time.monotonic() of the first arrival
        self.counts = dict.fromkeys(("received", "used", "skipped", "repeated", "filled"), 0)
        self.on_first: Callable[[], None] | None = None  # called once, when the first frame arrives

    @property
    def started(self) -> bool:
        return self.first_at is not None

    def push(self, image: np.ndarray) -> None:
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"a frame must be uint8 [{self.height}, {self.width}, 3], got {image.dtype} {image.shape}")
        first = False
        with self._lock:
            self._arrived.append(image)
            self.counts["received"] += 1
            if len(self._arrived) > self._capacity:
                self._arrived.popleft()
                self.counts["skipped"] += 1
            if self.first_at is None:
                self.first_at, first = time.monotonic(), True
        if first and self.on_first is not None:
            self.on_first()

    def take(self, chunk: int, count: int) -> np.ndarray:
        with self._lock:
            arrived, self._arrived = list(self._arrived), deque()
            m = len(arrived)
            if m >= count:
                picked = [arrived[(i + 1) * m // count - 1] for i in range(count)]
            else:
                held = arrived[-1] if arrived else (self._last if self._last is not None else self._fill)
                picked = arrived + [held] * (count - m)
            self.counts["used"] += min(m, count)
            self.counts["skipped"] += max(0, m - count)
            self.counts["filled" if self._last is None and not arrived else "repeated"] += max(0, count - m)
            self._last = picked[-1]
        return np.stack(picked)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"size": [self.height, self.width], "started": self.started, **self.counts}
