"""The trainer: phase 1 (Diffusion Forcing on world clips), then phase 2 (self-forcing rollouts with
the world as teacher, mixed with some phase-1 steps); DeepSpeed engine, EMA, checkpoints every N
steps with exact resume, a tqdm bar, a JSONL log, periodic checker evaluation of the EMA weights.

Every random draw of step i is keyed by (seed, i), so a run resumed at step i continues exactly as an
uninterrupted one would (same data, noise, rollouts; weights, optimizer, schedule and EMA restored).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..bundles.embedded import EMBEDDED_STREAM, EmbeddedModel, parameter_count
from ..engine.stream import StreamConfig
from ..models.config import DiTConfig
from ..sampling.schedule import FlowSchedule
from .attention import ChunkMaskAttention, recache_ids
from .config import TrainConfig
from .data import CHUNK, clip_batch, step_seed
from .ema import EMA
from .engine import build_engine, ds_config
from .objectives import clean_prefixes, masked_loss, noisy_inputs, sample_levels
from .self_forcing import self_forcing_batch


@dataclass
class StepInputs:
    """One step's batch: noisy latents x, per-frame t, target v, the condition (prompt ids; an avatar's
    per-frame drive), attention block ids, loss weights."""

    phase: str
    x: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    cond: torch.Tensor
    block_ids: torch.Tensor | list[int]
    weight: torch.Tensor
    info: dict[str, Any]


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine to min_lr_ratio over the whole run (both phases)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """The embedded text model's trainer; `block_frames`, `build_model`, the phase inputs, `loss`, `export`
    and `log_eval` are what another task (train/avatar.py) changes."""

    block_frames = CHUNK  # frames per attention block id and per loss weight

    def __init__(self, cfg: TrainConfig, stream: StreamConfig = EMBEDDED_STREAM) -> None:
        self.cfg = cfg
        self.stream = stream
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        torch.manual_seed(cfg.seed)
        model = self.build_model()
        self.schedule = FlowSchedule(stream.shift)
        self.sampler_steps = self.schedule.step_list(list(stream.steps), stream.warp_steps)
        cpu = cfg.device == "cpu"
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, ds_config(cfg.batch, cfg.grad_clip, cfg.zero_stage, cfg.bf16), cfg.lr, cfg.weight_decay, cfg.betas,
            lambda s: lr_factor(cfg, s), cpu=cpu)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []

    def build_model(self) -> torch.nn.Module:
        return EmbeddedModel(DiTConfig.from_dict(self.cfg.model))

    @property
    def model(self) -> EmbeddedModel:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- one optimizer step ---------------------------------------------------------------------
    def phase(self, step: int) -> str:
        if step < self.cfg.phase1_steps:
            return "p1"
        mix = torch.rand(1, generator=torch.Generator().manual_seed(step_seed(self.cfg.seed, step, 3))).item()
        return "p1" if mix < self.cfg.p2_mix else "p2"

    def phase1_inputs(self, step: int):
        cfg = self.cfg
        cb = clip_batch(step_seed(cfg.seed, step, 0), cfg.batch, cfg.clip_chunks, cfg.switch_prob, cfg.lead_in_prob,
                        cfg.lead_in_motion)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 1))
        b, chunks = cfg.batch, cfg.clip_chunks
        levels = sample_levels(self.schedule, self.sampler_steps, b, chunks, gen, clean_prefixes(b, chunks, gen, cfg.df_prob),
                               cfg.sampler_step_prob)
        x, t, v = noisy_inputs(self.schedule, cb.latents, levels.t, CHUNK, gen)
        tokens = cb.chunk_tokens[:, -1]  # the window is encoded under the newest chunk's prompt (re-cache)
        valid = (cb.chunk_tokens == tokens[:, None]).all(-1)  # chunks shown under another prompt get no loss
        valid &= torch.arange(chunks)[None, :] >= cb.lead_in_chunks[:, None]  # the lead-in is context only
        ids = torch.tensor([recache_ids(chunks, int(s) if s > 0 else None) for s in cb.switch_chunk])
        return x, t, v, tokens, ids, levels.noisy & valid, {}

    def phase2_inputs(self, step: int):
        cfg = self.cfg
        self.model.eval()
        sf = self_forcing_batch(self.model, self.stream, step_seed(cfg.seed, step, 2), cfg.p2_batch, cfg.p2_max_rollout,
                                cfg.p2_switch_prob)
        self.model.train()
        chunks = len(sf.block_ids)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, 1))
        prefix = torch.full((cfg.p2_batch,), chunks - 1)
        levels = sample_levels(self.schedule, self.sampler_steps, cfg.p2_batch, chunks, gen, prefix, cfg.sampler_step_prob)
        x0 = sf.x0.cpu()
        x, t, v = noisy_inputs(self.schedule, x0, levels.t, CHUNK, gen)
        # Some samples start from the sampler's own input at one of its steps instead of fresh noise; the
        # target still says "x̂0 = the teacher's chunk": v = (x_k − x0) / σ_k. Their loss is weighted by
        # σ_k², i.e. measured on x̂0: the own input can sit far from the teacher's chunk, and at σ = 0.25
        # the plain v-loss would weigh that x̂0 error 16× and drown every other sample.
        own = torch.rand(cfg.p2_batch, generator=gen) < cfg.p2_own_prob
        weight = levels.noisy.float()
        if own.any():
            last = slice((chunks - 1) * CHUNK, None)
            sigma = self.schedule.sigma(sf.own_t).reshape(-1, 1, 1, 1, 1)
            own_v = (sf.own_x.cpu() - x0[:, last]) / sigma
            sel = own.reshape(-1, 1, 1, 1, 1)
            x[:, last] = torch.where(sel, sf.own_x.cpu(), x[:, last])
            v[:, last] = torch.where(sel, own_v, v[:, last])
            t[:, last] = torch.where(own[:, None], sf.own_t[:, None].expand(-1, CHUNK), t[:, last])
            weight[:, -1] = torch.where(own, sigma.flatten() ** 2, weight[:, -1])
        if sf.rollout_chunks:
            # No object found in the generated context: the world has nothing to continue, and a ground-truth
            # target at a random place would teach the model to ignore its context (blur). No loss.
            weight[:, -1] *= sf.found.to(weight.dtype)
        return x, t, v, sf.tokens, sf.block_ids, weight, {"found": float(sf.found.float().mean()),
                                                                 "rollout": sf.rollout_chunks,
                                                                 "own": float(own.float().mean())}

    def inputs(self, step: int) -> StepInputs:
        """Everything step `step` trains on (a pure function of the seed, the step and, in phase 2, the weights)."""
        phase = self.phase(step)
        return StepInputs(phase, *(self.phase1_inputs if phase == "p1" else self.phase2_inputs)(step))

    def optimize(self, inp: StepInputs) -> float:
        """One DeepSpeed forward / backward / step on prepared inputs, then the EMA update; returns the loss."""
        dev = self.device
        attn = ChunkMaskAttention(self.model.dit.rope, self.block_frames, inp.block_ids)
        pred = self.engine(inp.x.to(dev), inp.t.to(dev), inp.cond.to(dev), attn)
        loss = self.loss(pred, inp.target.to(dev), inp.weight.to(dev))
        self.engine.backward(loss)
        self.engine.step()
        self.ema.update(self.model)
        return loss.item()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return masked_loss(pred, target, weight, self.block_frames)

    def train_step(self) -> dict[str, Any]:
        inp = self.inputs(self.step)
        loss = self.optimize(inp)
        self.step += 1
        return {"step": self.step, "phase": inp.phase, "loss": loss, "lr": self.scheduler.get_last_lr()[0], **inp.info}

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        tag = f"step{self.step:07d}"
        state = {"step": self.step, "ema": self.ema.state_dict(), "config": asdict(self.cfg), "elapsed": self.elapsed,
                 "history": self.history}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state)
        tags = sorted(p for p in self.ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-self.cfg.keep_ckpts]:
            shutil.rmtree(old, ignore_errors=True)
        return self.ckpt_dir / tag

    def load_checkpoint(self) -> bool:
        """Resume from the latest checkpoint under out/checkpoints; False when there is none."""
        if not (self.ckpt_dir / "latest").is_file():
            return False
        _, state = self.engine.load_checkpoint(str(self.ckpt_dir))
        saved = TrainConfig.from_dict(state["config"])
        if saved.model != self.cfg.model:
            raise ValueError(f"checkpoint model {saved.model} differs from the requested {self.cfg.model}")
        if saved.lr != self.cfg.lr:  # the optimiser and scheduler state carry the peak lr; a new one would be ignored
            raise ValueError(f"--lr {self.cfg.lr:g} differs from the checkpoint's {saved.lr:g}: a resumed run keeps the "
                             "peak learning rate it started with (the schedule's shape follows the new step totals)")
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]
        self.ema.load_state_dict(state["ema"])
        return True

    def ema_model(self) -> EmbeddedModel:
        """A copy of the model holding the EMA weights (eval mode, no grad)."""
        return self.ema.copy_to(copy.deepcopy(self.model)).eval().requires_grad_(False)

    def summary(self) -> dict[str, Any]:
        """What the exported weights record of the run."""
        cfg = self.cfg
        return {"step": self.step, "seed": cfg.seed, "phase1_steps": cfg.phase1_steps,
                "phase2_steps": cfg.phase2_steps, "elapsed_s": round(self.elapsed, 1)}

    def export(self, path: str | Path) -> Path:
        """The EMA weights, the stream settings and a training summary to one safetensors file."""
        from ..bundles.embedded import save_weights

        return save_weights(self.ema_model(), path, stream=self.stream, train=self.summary())

    # --- the run ----------------------------------------------------------------------------------
    def run(self, progress: bool = True, until: int | None = None) -> list[dict[str, Any]]:
        """Train to `until` (default: the configured total), checkpointing and logging as configured."""
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        end = cfg.total_steps if until is None else until
        self.out.mkdir(parents=True, exist_ok=True)
        log = (self.out / "log.jsonl").open("a")
        bar = tqdm(total=end, initial=self.step, disable=not progress, dynamic_ncols=True, desc="train")
        smooth, window, t_last = None, [], time.perf_counter()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                rec = self.train_step()
                self.elapsed += time.perf_counter() - t0
                smooth = rec["loss"] if smooth is None else 0.95 * smooth + 0.05 * rec["loss"]
                window.append(rec)
                bar.update(1)
                post = {"loss": f"{smooth:.4f}", "phase": rec["phase"], "lr": f"{rec['lr']:.1e}"}
                if "found" in rec:
                    post["found"] = f"{rec['found']:.2f}"
                bar.set_postfix(post, refresh=False)
                if self.step % cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    entry = {"step": self.step, "loss": sum(r["loss"] for r in window) / len(window), "smooth": smooth,
                             "lr": rec["lr"], "elapsed_s": round(self.elapsed, 2),
                             "s_per_step": round((now - t_last) / len(window), 3),
                             "p2_steps": sum(r["phase"] == "p2" for r in window)}
                    found = [r["found"] for r in window if "found" in r]
                    if found:
                        entry["found"] = sum(found) / len(found)
                    self.history.append(entry)
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                    window, t_last = [], now
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != end:
                    self.log_eval(log, bar)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()
        if self.step == end and cfg.ckpt_every and self.step % cfg.ckpt_every:
            self.save_checkpoint()
        return self.history

    def evaluate_ema(self) -> tuple[dict, dict[str, Any], str]:
        """The checker's eval of the EMA weights: (result, what the log records, a one-line summary)."""
        from .evaluate import evaluate, format_summary

        result = evaluate(self.ema_model(), self.cfg.eval_prompts, self.cfg.eval_frames, seed=10_000)
        entry = {"eval": {k: v for k, v in result["summary"].items() if k != "latency"},
                 "latency": result["summary"]["latency"].get("prompt")}
        return result, entry, format_summary(result["summary"])

    def log_eval(self, log, bar=None) -> dict:
        result, entry, line = self.evaluate_ema()
        log.write(json.dumps({"step": self.step, **entry}) + "\n")
        log.flush()
        (bar.write if bar is not None else print)(f"[eval @ {self.step}] {line}")
        return result

    def describe(self) -> str:
        cfg = self.cfg
        return (f"embedded model: {parameter_count(self.model) / 1e6:.2f}M parameters, {cfg.phase1_steps} phase-1 steps "
                f"(batch {cfg.batch} × {cfg.clip_chunks * CHUNK} frames) + {cfg.phase2_steps} phase-2 steps "
                f"(batch {cfg.p2_batch}, rollouts ≤ {cfg.p2_max_rollout} chunks, {cfg.p2_mix:.0%} phase-1 mix), out {self.out}")
