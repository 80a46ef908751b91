"""Every setting of a training run, in one dataclass (saved in checkpoints and the exported file).
Torch-free, so `streamgen --help` stays fast."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


TASKS = ("embedded", "embedded-avatar")  # what `streamgen train --model` trains


def default_model(task: str = "embedded") -> dict[str, Any]:
    """The DiT dimensions of a task's model (EMBEDDED_DIT, or the avatar's AVATAR_DIT)."""
    if task == "embedded-avatar":
        from ..bundles.embedded_avatar import AVATAR_DIT

        return AVATAR_DIT.to_dict()
    from ..bundles.embedded import EMBEDDED_DIT

    return EMBEDDED_DIT.to_dict()


LEAD_IN_MOTIONS = ("any", "still")  # see data.clip_batch


@dataclass
class TrainConfig:
    """Every setting of a run (saved in checkpoints and the exported file)."""

    out: str = "runs/embedded"
    task: str = "embedded"          # TASKS: the text model on the procedural world, or the avatar
    seed: int = 0
    phase1_steps: int = 2700
    phase2_steps: int = 500
    batch: int = 8                  # phase-1 clips per step
    clip_chunks: int = 3            # 9-frame clips = the window cache's capacity
    switch_prob: float = 0.3        # phase-1 clips with a prompt switch (at a chunk boundary)
    df_prob: float = 0.3            # phase-1 clips with every chunk noisy (else a clean prefix of 1–2 chunks)
    sampler_step_prob: float = 0.25  # levels drawn from the sampler's own timesteps instead of the table
    lead_in_prob: float = 0.0       # phase-1 clips (no switch) that start still or moving another way
    lead_in_motion: str = "any"     # LEAD_IN_MOTIONS: moves another way or holds still (any), or only holds still
    p2_batch: int = 8               # rollouts per phase-2 step
    p2_max_rollout: int = 4         # context chunks generated before the target: R ∈ 0…this
    p2_switch_prob: float = 0.4     # phase-2 steps whose rollout switches prompt at a chunk boundary 1…R
    p2_own_prob: float = 0.5        # phase-2 targets denoised from the sampler's own step input (else fresh noise)
    p2_mix: float = 0.25            # share of phase-2 steps that are phase-1 steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ckpt_every: int = 100
    keep_ckpts: int = 2
    log_every: int = 10
    eval_every: int = 300           # checker evaluation of the EMA weights every N steps (0: only at the end)
    eval_prompts: int = 8
    eval_frames: int = 48
    threads: int | None = 1         # 1 beats 2 on a shared 2-core box (see docs/embedded_model.md)
    zero_stage: int = 0
    bf16: bool = False
    device: str = "cpu"
    model: dict[str, Any] = field(default_factory=default_model)

    @property
    def total_steps(self) -> int:
        return self.phase1_steps + self.phase2_steps

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


class _Defaults:
    """Attribute access to TrainConfig's field defaults without building one (no model import)."""

    def __getattr__(self, name: str) -> Any:
        for f in fields(TrainConfig):
            if f.name == name:
                return f.default
        raise AttributeError(name)


DEFAULTS = _Defaults()
