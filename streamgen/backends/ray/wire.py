"""What crosses process boundaries in the Ray backend, and how.

Tensors travel as numpy arrays (`pack`): Ray stores numpy zero-copy in the object store, while a
torch tensor is pickled (measured 1.5–4.7× slower at 1–8 MB, spec ecosystem §2). bfloat16 has no
numpy dtype, so it travels as its int16 bit pattern. `unpack` copies out of the (read-only,
shared-memory) buffer so a stage never pins object-store memory in its caches.

Per chunk and hop only a `WireWork` crosses: the chunk's latents plus four integers. Prompt contexts
go to every stage once per context id (`Manifest.contexts`), never with each chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import Tensor

from ...bundles.bundle import BundleSpec
from ...engine.noise import NoiseSource
from ...engine.stream import StreamConfig

Packed = Union[np.ndarray, tuple]


def pack(t: Tensor) -> Packed:
    """A tensor as a numpy array (zero-copy on CPU); bf16 as ("bf16", int16 view)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return ("bf16", t.view(torch.int16).numpy())
    return t.numpy()


def unpack(a: Packed, device: str | torch.device = "cpu") -> Tensor:
    """Back to a writable tensor on `device` (one copy out of the object store)."""
    if isinstance(a, tuple):
        return torch.from_numpy(np.array(a[1])).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.array(a)).to(device)


def nbytes(a: Any) -> int:
    """Payload bytes of packed tensors inside nested containers (for the bytes-per-hop figures)."""
    if isinstance(a, np.ndarray):
        return a.nbytes
    if isinstance(a, tuple) and len(a) == 2 and a[0] == "bf16":
        return a[1].nbytes
    if isinstance(a, dict):
        return sum(nbytes(v) for v in a.values())
    if isinstance(a, (list, tuple)):
        return sum(nbytes(v) for v in a)
    if isinstance(a, WireWork):
        return nbytes(a.x)
    return 0


@dataclass
class WireWork:
    """A chunk in flight between stages: latents at the input level of the receiving step."""

    chunk: int
    x: Packed
    context_id: int
    recache_id: int
    seed: int


@dataclass
class ChunkStart:
    """A chunk entering the pipeline: stage 0 draws its initial noise itself (counter-based noise),
    so only these integers travel from the driver."""

    chunk: int
    context_id: int
    recache_id: int
    seed: int


@dataclass
class SessionSpec:
    """What a stage needs to host one stream's timestep slots (sent once per session)."""

    sid: str
    config: StreamConfig
    timesteps: list[float]
    steps: list[int]  # the denoising steps this stage owns for this session (consecutive; may be empty)


@dataclass
class SlotRebuild:
    """How a stage rebuilds one slot's KV after a fault: re-cache from the slot's recent inputs."""

    step: int
    frames: list[Packed]  # the slot's recent inputs, oldest first (chunks < `end_frame`)


@dataclass
class Rebuild:
    """Rewind of one session in one stage to chunk boundary `end_frame` (chunks before it delivered)."""

    end_frame: int
    context_id: int
    recache_id: int
    slots: list[SlotRebuild] = field(default_factory=list)


def noise_source(seed: int, config: StreamConfig, in_dim: int, device: str | torch.device = "cpu") -> NoiseSource:
    """The stream's NoiseSource for a seed (same shape and dtype as `Stream._build` makes)."""
    return NoiseSource(seed, (1, config.chunk_frames, in_dim, config.latent_height, config.latent_width), config.dtype, device)


BundleRecipe = Union[str, BundleSpec, Callable[[], Any]]


def build_bundle(recipe: BundleRecipe):
    """A model bundle inside an actor: from a `BundleSpec` (name, model dir, dtype, quantization, compile;
    a bare registry name is a spec with defaults) through `load_bundle`, or from a picklable zero-argument
    recipe (benchmarks: a seeded random DiT of a given size). Weights are built here, never shipped."""
    if isinstance(recipe, str):
        recipe = BundleSpec(recipe)
    return recipe.load() if isinstance(recipe, BundleSpec) else recipe()


def bundle_name(recipe: BundleRecipe) -> str:
    return recipe if isinstance(recipe, str) else getattr(recipe, "name", None) or repr(recipe)
