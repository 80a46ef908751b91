"""`Stream`: everything one live generation owns — caches, prompt timeline, noise, frame index — so
many streams run side by side in one process without touching each other.

Controls (`set_prompt`, `set_params`, `reset`) are queued and applied at the next chunk boundary;
each is acknowledged with the latent frame where it took effect.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor

from ..cache.kv import KVCache
from ..cache.policy import make_policy
from ..errors import InputError
from ..models.dit import WanDiT
from ..names import SAMPLERS, SCHEDULES
from ..sampling.denoiser import Denoiser
from ..sampling.few_step import FewStepSampler
from ..sampling.rolling import RollingSampler
from ..sampling.schedule import FlowSchedule
from .execution import (
    Calls,
    ChunkInputs,
    ExactExecution,
    Execution,
    RollingExecution,
    TimestepSlotExecution,
    drive,
)
from .noise import NoiseSource
from .prompts import EmbeddingCache, PromptEncoder, PromptTimeline, Transition, describe_prompt

PARAMS = ("seed", "steps", "transition")


@dataclass(frozen=True)
class StreamConfig:
    """Everything that fixes a stream's numerics; a model family's YAML fills most of it."""

    latent_height: int
    latent_width: int
    policy: str = "window_sink"
    policy_settings: dict[str, Any] = field(default_factory=dict)  # empty: the policy's reference defaults
    sampler: str = "few_step"
    schedule: str = "exact"
    steps: tuple[float, ...] = (1000, 750, 500, 250)
    warp_steps: bool = True
    shift: float = 5.0
    context_noise: float = 0.0
    chunk_frames: int = 3
    seed: int = 0
    batch_slots: bool = True
    transition: Transition = Transition()
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.sampler == "rolling" and self.schedule != "exact":
            raise InputError("the rolling sampler runs with schedule 'exact' only")
        if self.sampler == "rolling" and self.transition.kind == "recache":
            object.__setattr__(self, "transition", Transition("blend", 1))
        object.__setattr__(self, "steps", tuple(float(s) for s in self.steps))


Tag = Any  # the caller's handle for one control (the client's message id), returned in its ack


@dataclass(frozen=True)
class Ack:
    """A control applied at a chunk boundary: `frame` is the first latent frame generated under it;
    `tag` is what the caller queued the control with, so every control gets its own ack."""

    of: str
    frame: int
    chunk: int
    detail: dict[str, Any] = field(default_factory=dict)
    tag: Tag = None


@dataclass(frozen=True)
class Control:
    """A queued control: applied at the first chunk boundary at or after latent frame `at_frame`."""

    kind: str
    value: Any
    at_frame: int | None = None
    tag: Tag = None


@dataclass
class Chunk:
    """One chunk of clean latents [B, F, C, H, W] starting at latent frame `first_frame`; `audio`: the samples
    that drove it (an audio-driven stream), else None."""

    index: int
    first_frame: int
    latents: Tensor
    acks: list[Ack]
    audio: Tensor | None = None


class Stream:
    """A live chunk-causal generation: `next_chunk()` → latents; controls land at chunk boundaries."""

    def __init__(self, model: WanDiT, encoder: PromptEncoder, config: StreamConfig, prompt: str | Tensor,
                 execution_factory: Callable[["Stream"], Execution] | None = None) -> None:
        """`execution_factory` swaps where chunks are computed (e.g. Ray stages); default: in process."""
        self.model = model
        self.execution_factory = execution_factory or local_execution
        self.embed = EmbeddingCache(encoder)
        self.config = config
        self.policy = make_policy(config.policy, **config.policy_settings)
        self._pending: list[Control] = []
        self._lock = threading.Lock()  # controls may come from another thread than next_chunk()
        self._acks: list[Ack] = []
        self.timeline = PromptTimeline(self.embed(prompt))
        self.prompt = prompt
        self._build()

    # --- controls ------------------------------------------------------------------------------
    def set_prompt(self, prompt: str | Tensor, transition: Transition | None = None, at_frame: int | None = None,
                   tag: Tag = None) -> None:
        """Queue a prompt change for the next chunk boundary, or the first chunk starting at or after
        latent frame `at_frame` (a timeline); acknowledged in the result that follows."""
        transition = transition or self.config.transition
        if self.config.sampler == "rolling" and transition.kind == "recache":
            raise InputError("the rolling sampler supports 'blend' transitions only (its cache holds no re-cacheable window)")
        self.embed(prompt)  # encode now: a bad prompt fails here, not mid-stream
        self._queue(Control("prompt", (prompt, transition), at_frame, tag))

    def set_params(self, tag: Tag = None, **params: Any) -> None:
        """Queue parameter changes (seed, steps, transition); unknown names are refused with the known list."""
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise InputError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMS)}")
        if "steps" in params and len(params["steps"]) != len(self.config.steps) and (
                self.config.schedule != "exact" or self.config.sampler != "few_step"):
            raise InputError("timestep-slot and rolling streams tie caches/windows to the step count: it cannot change mid-stream")
        self._validated(**params)
        self._queue(Control("params", params, None, tag))

    def reset(self, tag: Tag = None) -> None:
        """Queue a restart from frame 0 with the current prompt (caches cleared)."""
        self._queue(Control("reset", None, None, tag))

    @property
    def reset_pending(self) -> bool:
        with self._lock:
            return any(c.kind == "reset" for c in self._pending)

    def _queue(self, control: Control) -> None:
        with self._lock:
            self._pending.append(control)

    def _take(self, due: Callable[[Control], bool]) -> list[Control]:
        """Remove and return the queued controls for which `due` holds, in order."""
        with self._lock:
            taken = [c for c in self._pending if due(c)]
            self._pending = [c for c in self._pending if not due(c)]
        return taken

    # --- generation ----------------------------------------------------------------------------
    def chunk_steps(self) -> Calls[Chunk]:
        """The DiT calls of the next chunk (for an engine loop to batch with other streams'); returns it.
        The driver runs it under `torch.no_grad()` (grad mode is per thread, not per generator).

        Resets queued by now restart the stream first — each acknowledged with its own tag; the other
        controls land when their chunk starts (`_inputs`), which may be later within this chunk's calls."""
        resets = self._take(lambda c: c.kind == "reset")
        if resets:
            self.timeline.blend = None
            self._build()
            self._acks += [Ack("reset", 0, 0, tag=c.tag) for c in resets]
        j, latents = yield from self.execution.chunk(self._inputs)
        acks, self._acks = self._acks, []
        return Chunk(j, j * self.config.chunk_frames, latents, acks, self.execution.chunk_audio(j))

    @torch.no_grad()
    def next_chunk(self) -> Chunk:
        """The next chunk, computed alone."""
        return drive(self.denoiser, self.chunk_steps())

    @property
    def frame(self) -> int:
        """Latent frames started so far (the index the next control would land at, in exact mode)."""
        return self.execution.started * self.config.chunk_frames

    @property
    def kv_bytes(self) -> int:
        return self.execution.kv_bytes

    @property
    def dit_calls(self) -> int:
        return self.denoiser.calls

    # --- internals -----------------------------------------------------------------------------
    def _validated(self, **params: Any) -> StreamConfig:
        changes = {k: (tuple(v) if k == "steps" else v) for k, v in params.items()}
        if isinstance(changes.get("transition"), dict):
            changes["transition"] = Transition(**changes["transition"])
        cfg = replace(self.config, **changes)
        FlowSchedule(cfg.shift).step_list(list(cfg.steps), cfg.warp_steps)
        return cfg

    def _build(self) -> None:
        cfg, mcfg = self.config, self.model.cfg
        self.schedule = FlowSchedule(cfg.shift)
        self.timesteps = self.schedule.step_list(list(cfg.steps), cfg.warp_steps)
        self.denoiser = Denoiser(self.model, self.policy)
        self.noise = NoiseSource(cfg.seed, (1, cfg.chunk_frames, mcfg.in_dim, cfg.latent_height, cfg.latent_width), cfg.dtype,
                                 next(self.model.parameters()).device)
        self.execution = self.execution_factory(self)

    def allocate_cache(self) -> KVCache:
        """A fresh cache of this stream's policy, geometry, dtype and device."""
        cfg, mcfg = self.config, self.model.cfg
        tokens = (cfg.latent_height // mcfg.patch_size[1]) * (cfg.latent_width // mcfg.patch_size[2])
        return self.policy.allocate(mcfg.num_layers, 1, tokens, mcfg.num_heads, mcfg.head_dim, cfg.dtype,
                                    next(self.model.parameters()).device)

    def _inputs(self, chunk: int) -> ChunkInputs:
        """Apply queued controls at this chunk boundary, then give the chunk its conditioning and noise."""
        frame = chunk * self.config.chunk_frames
        for control in self._take(lambda c: c.kind != "reset" and (c.at_frame is None or c.at_frame <= frame)):
            kind, value = control.kind, control.value
            if kind == "prompt":
                prompt, transition = value
                self.prompt = prompt
                self.timeline.change(self.embed(prompt), transition, chunk)
                details = describe_prompt(self.embed.encoder, prompt)
                self._acks.append(Ack("prompt", frame, chunk, {"transition": transition.kind, **details}, control.tag))
            elif kind == "params":
                old_steps = self.config.steps
                self.config = self._validated(**value)
                if "seed" in value:
                    self.noise = NoiseSource(self.config.seed, self.noise.shape, self.noise.dtype, self.noise.device)
                if "steps" in value and self.config.steps != old_steps:
                    self.timesteps = self.schedule.step_list(list(self.config.steps), self.config.warp_steps)
                    self.execution.sampler.timesteps = self.timesteps
                self._acks.append(Ack("params", frame, chunk, dict(value), control.tag))
        prompt = self.timeline.for_chunk(chunk)
        return ChunkInputs(prompt.context, prompt.context_id, prompt.recache_id, self.noise)


def local_execution(stream: Stream) -> Execution:
    """In-process execution of the stream's sampler and schedule (exact, timestep-slot or rolling)."""
    cfg = stream.config
    if cfg.sampler == "rolling":
        sampler = RollingSampler(stream.schedule, stream.timesteps, cfg.chunk_frames, context_noise=cfg.context_noise)
        return RollingExecution(stream.denoiser, stream.allocate_cache(), sampler)
    sampler = FewStepSampler(stream.schedule, stream.timesteps, cfg.context_noise)
    if cfg.schedule == "timestep-slot":
        return TimestepSlotExecution(stream.denoiser, [stream.allocate_cache() for _ in stream.timesteps], sampler,
                                     cfg.chunk_frames, cfg.batch_slots)
    return ExactExecution(stream.denoiser, stream.allocate_cache(), sampler, cfg.chunk_frames)
