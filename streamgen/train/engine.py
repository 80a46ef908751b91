"""DeepSpeed around the embedded model: one CPU process with gloo (DS_ACCELERATOR=cpu, fp32), or a
GPU with ZeRO / bf16 from the same config dict."""
from __future__ import annotations

import os
import socket
import sys
from typing import Any

import torch
from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cpu: bool = True) -> None:
    """Single-process DeepSpeed: env for rank 0 of 1, skip the shm op build, gloo on CPU (idempotent)."""
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module whose shm op build we skip)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a 45 s JIT build we do not need
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", verbose=False)


def ds_config(batch: int, grad_clip: float, zero_stage: int = 0, bf16: bool = False) -> dict[str, Any]:
    """fp32 ZeRO-0 on CPU; ZeRO stage and bf16 are switches for a GPU run."""
    return {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, config: dict[str, Any], lr: float, weight_decay: float, betas: tuple[float, float],
                 lr_lambda, cpu: bool = True):
    """deepspeed.initialize with a torch AdamW (no JIT-built fused optimizer) and a LambdaLR schedule."""
    setup_distributed(cpu)
    import deepspeed

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=config)
    return engine, optimizer, scheduler
