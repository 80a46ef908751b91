"""Checker metrics of streams generated through the real Stream API (first chunk from noise, no real
frame), the hook `streamgen eval` builds on. One stream per prompt item; prompt switches are queued
with `Stream.set_prompt(at_frame=…)` and land at the next chunk boundary, as for a live viewer."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from ..bundles.bundle import ModelBundle
from ..bundles.embedded import EmbeddedModel, bundle_from_model, embedded_bundle
from ..engine.stream import Stream
from ..world import Prompt, all_prompts
from ..world.checker import clip_metrics
from ..world.report import aggregate

PromptItem = Union[str, Sequence[tuple[int, str]]]  # one prompt, or [(frame, prompt), …] starting at frame 0
SUMMARY_RATES = ("colour", "shape", "direction", "colour_direction", "all", "still")


def as_bundle(model: ModelBundle | EmbeddedModel | str | Path) -> ModelBundle:
    if isinstance(model, ModelBundle):
        return model
    if isinstance(model, EmbeddedModel):
        return bundle_from_model(model)
    return embedded_bundle(model)


def eval_prompts(n: int, frames: int, seed: int = 0) -> list[PromptItem]:
    """A fixed mixed set: even items one prompt for the whole stream, odd items switch once at the
    chunk boundary nearest the middle (a random non-empty subset of attributes changes)."""
    rng = np.random.default_rng(seed)
    pool = all_prompts()
    out: list[PromptItem] = []
    for i in range(n):
        p = pool[int(rng.integers(len(pool)))]
        if i % 2 == 0:
            out.append(p.text())
            continue
        q = p
        while q == p:
            q = Prompt(**{a: (getattr(pool[int(rng.integers(len(pool)))], a) if rng.random() < 0.5 else getattr(p, a))
                          for a in ("colour", "shape", "direction")})
        out.append([(0, p.text()), (3 * round(frames / 6), q.text())])
    return out


def _policy_overrides(bundle: ModelBundle, policy: str | dict[str, Any] | None) -> dict[str, Any]:
    if policy is None:
        return {}
    if isinstance(policy, str):
        return {"policy": policy, "policy_settings": bundle.stream.policy_settings if policy == bundle.stream.policy else {}}
    settings = dict(policy)
    name = settings.pop("policy", bundle.stream.policy)
    return {"policy": name, "policy_settings": settings}


def generate(bundle: ModelBundle, item: PromptItem, frames: int, seed: int, **overrides: Any) -> tuple[np.ndarray, list[str], float]:
    """One stream: (frames uint8 [T, 3, H, W], prompt text per frame, seconds spent generating)."""
    timeline = [(0, item)] if isinstance(item, str) else sorted(item)
    if timeline[0][0] != 0:
        raise ValueError("a prompt timeline starts at frame 0")
    config = replace(bundle.stream, seed=seed, **overrides)
    stream = Stream(bundle.dit, bundle.text_encoder, config, timeline[0][1])
    for frame, prompt in timeline[1:]:
        stream.set_prompt(prompt, at_frame=frame)
    decoder = bundle.decoder()
    current, out, per_frame = timeline[0][1], [], []
    start = time.perf_counter()
    while sum(len(c) for c in out) < frames:
        chunk = stream.next_chunk()
        for ack in chunk.acks:
            if ack.of == "prompt":
                current = next(p for f, p in reversed(timeline) if f <= ack.frame)
        out.append(decoder.push(chunk.latents)[0])
        per_frame += [current] * chunk.latents.shape[1]
    seconds = time.perf_counter() - start
    video = torch.cat(out)[:frames].permute(0, 3, 1, 2).numpy()
    return video, per_frame[:frames], seconds


def evaluate(bundle_or_model: ModelBundle | EmbeddedModel | str | Path, prompts: Sequence[PromptItem] | int = 8,
             frames: int = 48, policy: str | dict[str, Any] | None = None, seed: int = 0, **overrides: Any) -> dict:
    """Generate one stream per prompt item and score it with the checker.

    prompts: items (a prompt text, or [(frame, text), …]) or a count for `eval_prompts(count, frames, seed)`.
    policy: None (the bundle's), a policy name, or {"policy": name, **settings}. overrides: other
    StreamConfig fields (steps, shift, …). Returns {"runs": [...], "summary": {...}} (JSON-able).
    """
    bundle = as_bundle(bundle_or_model)
    items = eval_prompts(prompts, frames, seed) if isinstance(prompts, int) else list(prompts)
    settings = {**_policy_overrides(bundle, policy), **overrides}
    runs, seconds = [], 0.0
    for i, item in enumerate(items):
        video, per_frame, s = generate(bundle, item, frames, seed + i, **settings)
        seconds += s
        metrics = clip_metrics(video, per_frame)
        runs.append({"policy": settings.get("policy", bundle.stream.policy), "sampler": bundle.stream.sampler,
                     "prompt": item if isinstance(item, str) else [list(x) for x in item], "seed": seed + i,
                     "frames_per_s": len(video) / s, **metrics})
    group = aggregate(runs)[0]
    m = group["metrics"]
    tokens_per_frame = (bundle.stream.latent_height // bundle.dit.cfg.patch_size[1]) * (
        bundle.stream.latent_width // bundle.dit.cfg.patch_size[2])
    summary = {"streams": len(runs), "frames": frames,
               **{k: m.get(f"rates.{k}") for k in SUMMARY_RATES},
               "mid_fraction": m.get("quality.mid_fraction"), "sharpness": m.get("quality.sharpness"),
               "latency": group["latency"],
               "frames_per_s": len(runs) * frames / seconds, "tokens_per_s": len(runs) * frames * tokens_per_frame / seconds}
    return {"summary": summary, "runs": runs}


def format_summary(summary: dict) -> str:
    """One line: adherence rates, quality, switch latency, speed."""
    pct = lambda v: "  -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731
    lat = summary["latency"].get("prompt", {})
    med = lat.get("median_frames")
    return (f"colour {pct(summary['colour'])} shape {pct(summary['shape'])} direction {pct(summary['direction'])} "
            f"all {pct(summary['all'])} still {pct(summary['still'])} | mid {summary['mid_fraction'] or 0:.3f} | "
            f"switch median {'-' if med is None else f'{med:.0f}'} fr, never {lat.get('never', 0)}/{lat.get('switches', 0)} | "
            f"{summary['frames_per_s']:.1f} fr/s")
