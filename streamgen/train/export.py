"""Export the EMA weights of a run to one safetensors file (`embedded_bundle(path)` loads it)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..bundles.embedded import save_weights
from .loop import Trainer


def export_ema(trainer: Trainer, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the EMA weights, the stream settings and a training summary (step, seed, elapsed)."""
    cfg = trainer.cfg
    summary = {"step": trainer.step, "seed": cfg.seed, "phase1_steps": cfg.phase1_steps, "phase2_steps": cfg.phase2_steps,
               "elapsed_s": round(trainer.elapsed, 1)}
    return save_weights(trainer.ema_model(), path, dtype=dtype, stream=trainer.stream, train=summary)
