"""Audio-driven streams (the embedded avatar, docs/avatar_world.md): a driven DiT whose cache holds the
reference image as its sink frame and whose every chunk is driven per frame by the audio of that frame.

- The reference: before chunk 0 (and after a reset) one call writes the reference latent at t = 0 into
  cache frame 0; the window policy's one-frame sink keeps it there for the life of the stream. Chunk j
  then sits at cache frame 1 + j·F (`frame_offset`), its video frames still count from 0.
- The audio: an `AudioBuffer` takes samples from any thread (a microphone track, an agent's WebSocket, a
  file) and hands chunk j exactly F·S samples when chunk j starts, never waiting: audio that has not
  arrived yet is silence (the avatar idles) and is counted. Those samples become the chunk's drive
  features (through the model's `AudioDriven.drive`) and travel with its frames (`Chunk.audio`), so
  what is played beside frame n is what drove frame n.

Wired in through the stream's execution seam (`use_drive`), the exact schedule only; the prompt is
ignored (the model has no text), so there is nothing to re-cache.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..cache.kv import CallSpec
from ..errors import InputError
from ..models.dit import CrossKV
from ..sampling.few_step import FewStepSampler
from .execution import Calls, ChunkInputs, ExactExecution, Inputs

if TYPE_CHECKING:
    from .stream import Stream


Driver = Callable[[np.ndarray, int], Tensor]
"""One stream's drive: (samples of frames first_frame … as float32 [F·S], first_frame) → drive [1, F, D] (audio
features + the stream's idle schedule). Asked chunk after chunk, so it may keep its place (a stateful object)."""


class AudioDriven(Protocol):
    """What an audio-driven model supplies (the bundle's `avatar`)."""

    sample_rate: int
    samples_per_frame: int  # audio samples per video frame (= per latent frame for pixel latents)

    def driver(self, seed: int) -> Driver:
        """The drive of a new stream with this seed (a reset makes a new one)."""

    def rest_drive(self) -> Tensor:
        """The drive of the reference frame (silence, at rest) [1, 1, D]."""

    def reference_latent(self, image: np.ndarray) -> Tensor:
        """A reference picture uint8 [H, W, 3] → its latent [1, 1, C, h, w] (clear error if unusable)."""


class AudioOverflowError(InputError):
    """More audio pushed ahead of the video than the buffer holds."""


class AudioBuffer:
    """Samples in, whole chunks out: `push` from any thread, `take` when a chunk starts (never blocks).

    Bounded: a push that would hold more than `capacity` samples (audio far faster than real time) is
    refused whole with AudioOverflowError and nothing is lost of what was buffered. `clear` drops what is
    buffered (an interruption). Counters: `pushed`, `played` (real samples handed to chunks), `filled`
    (silence handed out because audio was late), `dropped` (cleared)."""

    def __init__(self, sample_rate: int, capacity: int | None) -> None:
        self.sample_rate, self.capacity = sample_rate, capacity
        self._parts: list[np.ndarray] = []
        self._held = 0
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(("pushed", "played", "filled", "dropped"), 0)
        self.first_push: float | None = None  # time.monotonic() of the first samples

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def push(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, np.float32).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise InputError("audio samples must be finite numbers")
        with self._lock:
            if self.capacity is not None and self._held + len(x) > self.capacity:
                raise AudioOverflowError(
                    f"audio is {(self._held + len(x)) / self.sample_rate:.1f} s ahead of the video, over the "
                    f"{self.capacity / self.sample_rate:.1f} s buffer: push it closer to real time")
            if len(x):
                self._parts.append(x)
                self._held += len(x)
                self.counts["pushed"] += len(x)
                if self.first_push is None:
                    self.first_push = time.monotonic()

    def take(self, n: int) -> tuple[np.ndarray, int]:
        """The next `n` samples, silence where none have arrived; returns (samples, how many were real)."""
        out = np.zeros(n, np.float32)
        got = 0
        with self._lock:
            while got < n and self._parts:
                part = self._parts[0]
                m = min(n - got, len(part))
                out[got:got + m] = part[:m]
                got += m
                if m == len(part):
                    self._parts.pop(0)
                else:
                    self._parts[0] = part[m:]
            self._held -= got
            self.counts["played"] += got
            self.counts["filled"] += n - got
        return out, got

    def clear(self) -> int:
        """Drop everything buffered (an interruption); returns how many samples were dropped."""
        with self._lock:
            dropped, self._parts, self._held = self._held, [], 0
            self.counts["dropped"] += dropped
        return dropped

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"sample_rate": self.sample_rate, "buffered_s": round(self._held / self.sample_rate, 3),
                    **{k: round(v / self.sample_rate, 3) for k, v in self.counts.items()}}


class DrivenExecution(ExactExecution):
    """Exact execution with the reference as the cache's sink frame and per-frame audio drive."""

    frame_offset = 1

    def __init__(self, stream: Stream, audio: AudioBuffer, model: AudioDriven, reference: Tensor) -> None:
        cfg = stream.config
        sampler = FewStepSampler(stream.schedule, stream.timesteps, cfg.context_noise)
        super().__init__(stream.denoiser, stream.allocate_cache(), sampler, cfg.chunk_frames)
        self.audio, self.model, self.reference = audio, model, reference
        self.driver = model.driver(cfg.seed)
        self._chunk_audio: dict[int, Tensor] = {}
        self.late_chunks = 0  # chunks that had to be (partly) generated from silence

    def prefill(self, inp: ChunkInputs, cross: CrossKV) -> Calls[None]:
        ref = self.reference.to(inp.noise.device, inp.noise.dtype)
        t = torch.zeros(ref.shape[:2])
        yield [self.denoiser.call(ref, t, cross, self.caches[0], CallSpec(0, ref.shape[1], "rerun"),
                                  self.model.rest_drive())]

    def chunk(self, inputs: Inputs) -> Calls[tuple[int, Tensor]]:
        return (yield from super().chunk(lambda j: self._driven(j, inputs(j))))

    def _driven(self, j: int, inp: ChunkInputs) -> ChunkInputs:
        samples, real = self.audio.take(self.chunk_frames * self.model.samples_per_frame)
        if real < len(samples):
            self.late_chunks += 1
        self._chunk_audio[j] = torch.from_numpy(samples)
        drive = self.driver(samples, j * self.chunk_frames)
        return replace(inp, drive=drive, recache_id=self.recache_id)

    def chunk_audio(self, chunk: int) -> Tensor | None:
        return self._chunk_audio.pop(chunk, None)


def use_drive(stream: Stream, audio: AudioBuffer, model: AudioDriven, reference: np.ndarray) -> DrivenExecution:
    """Make `stream` audio-driven (before its first chunk): the reference picture uint8 [H, W, 3] becomes
    its sink, `audio` drives its chunks; a reset keeps both."""
    cfg = stream.config
    if cfg.sampler != "few_step" or cfg.schedule != "exact":
        raise InputError(f"an audio-driven stream runs with sampler 'few_step' and schedule 'exact' (this stream: "
                         f"{cfg.sampler}, {cfg.schedule})")
    if stream.execution.started:
        raise InputError("audio drive is set before a stream's first chunk")
    if audio.sample_rate != model.sample_rate:
        raise InputError(f"the audio buffer runs at {audio.sample_rate} Hz, the model at {model.sample_rate} Hz")
    latent = model.reference_latent(reference)
    stream.execution_factory = lambda s: DrivenExecution(s, audio, model, latent)
    stream.execution = stream.execution_factory(stream)
    return stream.execution
