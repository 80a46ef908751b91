"""Phase 2, self-forcing style: the context comes from the model's own few-step rollouts through the
engine (the stream's sampler, execution and cache policy, batched, no grad), and the target is the
world's continuation of that context (world as teacher, `data.teacher_chunk`).

A rollout generates R context chunks from noise, then the target chunk R itself; prompt switches
happen at chunk boundaries and land with the stream's default re-cache transition. The training
sample is [last ≤ 2 generated chunks at t = 0, target chunk R], with the attention blocks the
re-cache produced. The target chunk's input is either fresh flow-matching noise on the teacher's
chunk, or the sampler's own input at one of its steps (its own denoising trajectory, which the
model must also map to the teacher's chunk: exposure bias inside the few-step chain, not only
across chunks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..bundles.embedded import EmbeddedModel
from ..cache.policy import make_policy
from ..engine.execution import ChunkInputs, ExactExecution
from ..engine.noise import NoiseSource
from ..engine.stream import StreamConfig
from ..sampling.denoiser import Denoiser
from ..sampling.few_step import FewStepSampler
from ..sampling.schedule import FlowSchedule
from .attention import recache_ids
from .data import CHUNK, Timeline, teacher_chunk, teacher_first_chunk, timeline


class RecordingDenoiser(Denoiser):
    """The engine's Denoiser, also keeping the inputs (x, t) of every denoising call of the current chunk."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[Tensor, Tensor]] = []

    def call(self, x, t, cross, cache, spec, drive=None):
        if spec.role == "denoise":
            if spec.start_frame != getattr(self, "_chunk_start", None):
                self.steps, self._chunk_start = [], spec.start_frame
            self.steps.append((x, t))
        return super().call(x, t, cross, cache, spec, drive)


@torch.no_grad()
def rollout(model: EmbeddedModel, stream: StreamConfig, tl: Timeline, chunks: int, seed: int
            ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Generate `chunks` chunks for a batch of timelines, exactly as B independent streams would
    (ExactExecution: few-step sampler, clean rerun, the policy's cache, re-cache on a prompt change).
    Switch chunks must be common to the batch (one re-cache pass serves all).
    → (latents [B, chunks·3, C, H, W], the last chunk's denoising inputs [(x_k, t_k)] in step order)."""
    cfg = model.cfg
    batch = tl.colour.shape[0]
    policy = make_policy(stream.policy, **stream.policy_settings)
    schedule = FlowSchedule(stream.shift)
    sampler = FewStepSampler(schedule, schedule.step_list(list(stream.steps), stream.warp_steps), stream.context_noise)
    tokens_per_frame = (stream.latent_height // cfg.patch_size[1]) * (stream.latent_width // cfg.patch_size[2])
    device = next(model.parameters()).device
    cache = policy.allocate(cfg.num_layers, batch, tokens_per_frame, cfg.num_heads, cfg.head_dim, stream.dtype, device)
    denoiser = RecordingDenoiser(model.dit, policy)
    execution = ExactExecution(denoiser, cache, sampler, stream.chunk_frames)
    noise = NoiseSource(seed, (batch, stream.chunk_frames, cfg.in_dim, stream.latent_height, stream.latent_width),
                        stream.dtype, device)
    state = {"tokens": None, "id": 0}

    def inputs(j: int) -> ChunkInputs:
        tokens = tl.chunk_tokens(j).to(device)
        if state["tokens"] is not None and not torch.equal(tokens, state["tokens"]):
            state["id"] += 1  # a new context: re-cache the window under it (the stream's default transition)
        state["tokens"] = tokens
        return ChunkInputs(model.text(tokens), state["id"], state["id"], noise)

    latents = torch.cat([execution.next_chunk(inputs)[1] for _ in range(chunks)], dim=1)
    return latents, denoiser.steps


@dataclass
class SelfForcingBatch:
    """Context latents at t = 0 then the teacher's target chunk; the model's own denoising inputs for
    that chunk; prompt ids, block ids, detection rate."""

    x0: Tensor            # [B, (ctx + 1)·3, C, H, W]: generated context, then the teacher's target chunk
    own_x: Tensor         # [B, 3, C, H, W]: the sampler's input for the target chunk at a random step k
    own_t: Tensor         # [B]: that step's timestep
    tokens: Tensor        # [B, 3]: the target chunk's prompt (the whole window is encoded under it)
    block_ids: list[int]  # attention blocks over [ctx chunks…, target]
    found: Tensor         # [B] bool: the teacher found the generated object (R = 0: its target is usable either way)
    rollout_chunks: int   # chunks generated before the target (0: the target is the first chunk)


def self_forcing_batch(model: EmbeddedModel, stream: StreamConfig, seed: int, batch: int, max_rollout: int,
                       switch_prob: float) -> SelfForcingBatch:
    """Draw R ∈ 0…max_rollout and maybe a switch chunk in 1…R (common to the batch), generate R + 1
    chunks, and build the teacher's version of chunk R: for R ≥ 1 the world's continuation of the
    object in the last generated frame; for R = 0 (the first chunk, from noise) the prompt's object
    where the model's own chunk put it."""
    rng = np.random.default_rng(seed)
    r = int(rng.integers(0, max_rollout + 1))
    switch = int(rng.integers(1, r + 1)) if r >= 1 and rng.random() < switch_prob else None
    tl = timeline(int(rng.integers(2**62)), batch, r + 1, switch)
    generated, steps = rollout(model, stream, tl, r + 1, int(rng.integers(2**62)))
    if r == 0:
        target, found = teacher_first_chunk(tl, generated)
    else:
        target, found = teacher_chunk(tl, r, generated[:, r * CHUNK - 1])
    ctx_chunks = min(r, 2)
    context = generated[:, (r - ctx_chunks) * CHUNK:r * CHUNK]
    # Blocks as the window holds them: a switch at the target's boundary re-cached the context together.
    ids = recache_ids(ctx_chunks + 1, ctx_chunks if switch == r else None)
    k = torch.from_numpy(rng.integers(0, len(steps), batch))
    own_x = torch.stack([steps[int(k[b])][0][b] for b in range(batch)])
    own_t = torch.stack([steps[int(k[b])][1][b, 0] for b in range(batch)])
    return SelfForcingBatch(torch.cat([context, target.to(context)], dim=1), own_x, own_t, tl.chunk_tokens(r), ids,
                            torch.from_numpy(found), r)
