"""What a timestep pipeline is made of: stages, steps per stage, actor resources and placement-group
bundles, the KV budget per slot, timeouts. Plain data (no Ray import), shared by the pipeline driver,
the placement backend and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...cache.policy import make_policy
from ...engine.stream import StreamConfig
from .wire import BundleRecipe


@dataclass
class PipelineConfig:
    """One timestep pipeline: stage count, steps per stage, resources per actor, budgets, timeouts.

    Resources are Ray actor options (`num_cpus`, `num_gpus`, `memory`, `resources`); they also size
    the placement group's bundles. `stage_steps` fixes which steps each stage owns for streams with
    that many steps (e.g. [[0, 1, 2], [3]]); otherwise steps are split evenly, earlier stages taking
    the remainder.
    """

    model: BundleRecipe = "tiny-random"
    stages: int = 2
    stage_steps: list[list[int]] | None = None
    stage_resources: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    decoder_resources: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 0.1})
    threads: int | None = None  # torch threads per actor (default: the actor's whole CPUs, at least 1)
    device: str | None = None  # default: cuda when the actor got a GPU, else cpu
    kv_budget_bytes: int = 2 * 1024**3  # per stage (all sessions' slot caches)
    max_sessions: int = 16
    batched: bool = True  # a stage runs all its work of a tick as one forward
    strategy: str = "PACK"
    tick_timeout_s: float = 30.0
    ping_timeout_s: float = 5.0
    start_timeout_s: float = 180.0
    recover_timeout_s: float = 120.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"a pipeline needs at least one stage, got {self.stages}")
        if self.stage_steps is not None and len(self.stage_steps) != self.stages:
            raise ValueError(f"stage_steps lists {len(self.stage_steps)} stages, the pipeline has {self.stages}")


def split_steps(num_steps: int, stages: int, explicit: list[list[int]] | None = None) -> list[list[int]]:
    """Consecutive steps per stage: `explicit` when it covers 0..num_steps−1 in order, else even."""
    if explicit is not None and [k for part in explicit for k in part] == list(range(num_steps)):
        return [list(part) for part in explicit]
    base, extra = divmod(num_steps, stages)
    out, k = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(list(range(k, k + n)))
        k += n
    return out


def actor_options(resources: dict[str, Any]) -> dict[str, Any]:
    known = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")
    unknown = set(resources) - set(known)
    if unknown:
        raise ValueError(f"unknown actor resource(s) {sorted(unknown)}; known: {', '.join(known)}")
    return dict(resources)


def bundle_of(resources: dict[str, Any]) -> dict[str, float]:
    """A placement-group bundle for an actor with these options (Ray refuses all-zero bundles)."""
    b = {"CPU": float(resources.get("num_cpus", 1))}
    if resources.get("num_gpus"):
        b["GPU"] = float(resources["num_gpus"])
    if resources.get("memory"):
        b["memory"] = float(resources["memory"])
    b.update({k: float(v) for k, v in resources.get("resources", {}).items()})
    if not any(v > 0 for v in b.values()):
        b["CPU"] = 0.01
    return b


def slot_cache_bytes(config: StreamConfig, model_cfg) -> int:
    """Bytes of one timestep slot's KV cache (what admission budgets)."""
    policy = make_policy(config.policy, **config.policy_settings)
    tokens = (config.latent_height // model_cfg.patch_size[1]) * (config.latent_width // model_cfg.patch_size[2])
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    return 2 * model_cfg.num_layers * policy.capacity_frames * tokens * model_cfg.num_heads * model_cfg.head_dim * itemsize
