"""Running `streamgen eval`: streams every combination from a source, scores it with the world checker and
gathers the runs into the report document (per-group tables, switch latency, the long stream)."""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from statistics import median
from typing import Any

from .plan import (
    SWITCH_KINDS,
    Combo,
    PolicySpec,
    Timeline,
    prompt_items,
    resolve_policies,
    steps_from_args,
    switch_frame,
    switch_items,
)

LONG_WINDOW_FRAMES = 1000     # first vs last frames of the long stream
LONG_WINDOW_CHUNKS = 100      # first vs last chunks for per-chunk time
TITLE = "streamgen eval: world checker per cache policy × sampler"


def _median(xs: Sequence[float]) -> float | None:
    return float(median(xs)) if xs else None


def chunk_time_summary(wall: Sequence[float], cpu: Sequence[float], window: int = LONG_WINDOW_CHUNKS) -> dict:
    """Median per-chunk time of the first vs the last `window` chunks (or half the stream), and last / first."""
    n = max(1, min(window, len(wall) // 2))
    out: dict[str, Any] = {"chunks": len(wall), "window_chunks": n}
    for name, xs in (("wall", wall), ("cpu", cpu)):
        first, last = _median(xs[:n]), _median(xs[-n:])
        out[name] = {"first_ms": None if first is None else 1e3 * first, "last_ms": None if last is None else 1e3 * last,
                     "ratio": (last / first) if first and last is not None else None}
    return out


def run_eval(source, combos: Sequence[Combo], prompts: Sequence[str], switches: Sequence[tuple[str, Timeline]],
             frames: int, seed: int, long_frames: int = 0, long_prompt: str | None = None,
             long_overrides: dict[str, Any] | None = None, progress: bool = True) -> dict:
    """Stream and score everything; returns {"runs", "failures", "long"} (runs: clip_metrics + identifying keys)."""
    from tqdm import tqdm

    from ..world.checker import clip_metrics, segment_metrics

    c = source.chunk_frames
    per_combo = (len(prompts) + len(switches)) * frames
    bar = tqdm(total=per_combo * len(combos) + long_frames, unit="frame", desc="eval", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    runs: list[dict] = []
    failures: list[dict] = []
    try:
        for combo in combos:
            bar.set_postfix_str(f"{combo.policy} {combo.sampler}", refresh=False)
            done = 0

            def tick(n: int) -> None:
                nonlocal done
                done += n
                bar.update(n)

            work = [("prompt", [(0, p)], seed + i) for i, p in enumerate(prompts)]
            work += [(f"switch:{kind}", tl, seed + 1000 + i) for i, (kind, tl) in enumerate(switches)]
            try:
                for kind, timeline, s in work:
                    result = source.stream(timeline, frames, s, combo.overrides, tick)
                    seconds = sum(result.chunk_wall_s)
                    runs.append({"policy": combo.policy, "sampler": combo.sampler, "kind": kind,
                                 "prompt": timeline[0][1] if len(timeline) == 1 else [list(x) for x in timeline],
                                 "seed": s, "frames_per_s": frames / seconds if seconds > 0 else None,
                                 **clip_metrics(result.video, result.prompts, warmup=c, chunk_frames=c)})
            except (RuntimeError, ValueError) as exc:  # e.g. a policy that cannot hold the stream (CacheFullError)
                failures.append({"policy": combo.policy, "sampler": combo.sampler, "error": f"{type(exc).__name__}: {exc}"})
                bar.update(per_combo - done)

        long = None
        if long_frames:
            overrides = dict(long_overrides or {})
            bar.set_postfix_str("long stream", refresh=False)
            try:
                result = source.stream([(0, long_prompt)], long_frames, seed + 2000, overrides, bar.update)
            except (RuntimeError, ValueError) as exc:
                failures.append({"policy": overrides.get("policy"), "sampler": "long stream",
                                 "error": f"{type(exc).__name__}: {exc}"})
                return {"runs": runs, "failures": failures, "long": None}
            window = max(1, min(LONG_WINDOW_FRAMES, (long_frames - c) // 2))
            metrics = clip_metrics(result.video, result.prompts, warmup=c, chunk_frames=c, drift_frames=window)
            seg = max(c, c * round(long_frames / 10 / c))
            long = {"prompt": long_prompt, "frames": long_frames, "seed": seed + 2000,
                    "policy": overrides.get("policy"), "policy_settings": overrides.get("policy_settings"),
                    "sampler": f"{overrides.get('sampler', 'few_step')}/{overrides.get('schedule', 'exact')}",
                    "window_frames": window, "rates": metrics["rates"], "quality": metrics["quality"],
                    "drift": metrics["drift"], "chunk_time": chunk_time_summary(result.chunk_wall_s, result.chunk_cpu_s),
                    "segments": segment_metrics(result.video, result.prompts, seg, warmup=c)}
    finally:
        bar.close()
    return {"runs": runs, "failures": failures, "long": long}


def build_groups(runs: Sequence[dict], combos: Sequence[Combo]) -> list[dict]:
    """One group per policy × sampler, in combo order: adherence and quality from the prompt streams,
    switch latency pooled over the switch streams (per attribute, and per switch kind)."""
    from ..world.checker import summarize_latency
    from ..world.report import aggregate

    prompt_groups = {(g["policy"], g["sampler"]): g for g in aggregate([r for r in runs if r["kind"] == "prompt"])}
    groups = []
    for combo in combos:
        key = (combo.policy, combo.sampler)
        mine = [r for r in runs if (r["policy"], r["sampler"]) == key]
        if not mine:
            continue
        switch_runs = [r for r in mine if r["kind"].startswith("switch:")]
        events = lambda rs: [e for r in rs for e in r["switch_events"]]
        base = prompt_groups.get(key, {"metrics": {}, "runs": 0})
        groups.append({"policy": combo.policy, "sampler": combo.sampler, "runs": base["runs"],
                       "switch_runs": len(switch_runs), "metrics": base["metrics"],
                       "latency": summarize_latency(events(switch_runs)),
                       "latency_by_kind": {k: summarize_latency(events([r for r in switch_runs if r["kind"] == f"switch:{k}"]))
                                           for k in SWITCH_KINDS},
                       "segments": None, "settings": combo.overrides})
    return groups


def evaluate_source(source, specs: Sequence[PolicySpec], schedules: Sequence[str], *, steps: Sequence[float] | None,
                    prompts: int | str, frames: int, switches: int, long_frames: int, seed: int, threads: int,
                    progress: bool = True) -> dict:
    """Everything `streamgen eval` does short of writing files: returns the report document."""
    default = source.default
    c = source.chunk_frames
    if long_frames and long_frames < 4 * c:
        raise ValueError(f"--long-frames must be 0 or at least {4 * c} (4 chunks), got {long_frames}")
    resolved = resolve_policies(specs or [PolicySpec(default.policy, default.policy)], default)
    step_list = steps_from_args(steps, default.steps)
    combos = [Combo(spec.label, f"{default.sampler}/{schedule}",
                    {"policy": spec.name, "policy_settings": settings, "schedule": schedule, "steps": step_list})
              for spec, settings in resolved for schedule in schedules]
    items = prompt_items(prompts, seed)
    sw = switch_items(switches, frames, c, seed)
    long_prompt = items[0] if items else prompt_items(1, seed)[0]
    start = time.perf_counter()
    result = run_eval(source, combos, items, sw, frames, seed, long_frames, long_prompt,
                      {"policy": default.policy, "policy_settings": default.policy_settings,
                       "sampler": default.sampler, "schedule": default.schedule, "steps": step_list}, progress)
    settings = {"model": source.name, "steps": list(step_list), "frames": frames, "prompts": prompts,
                "prompt_streams": len(items), "switch_streams": len(sw), "switch_frame": switch_frame(frames, c),
                "long_frames": long_frames, "seed": seed, "threads": threads, "chunk_frames": c,
                "policies": [s.label for s in (specs or [])] or [default.policy], "schedules": list(schedules),
                "seconds": round(time.perf_counter() - start, 1)}
    return {"title": TITLE, "group_keys": ["policy", "sampler"], "settings": settings,
            "groups": build_groups(result["runs"], combos), "failures": result["failures"], "long": result["long"],
            "runs": result["runs"]}


__all__ = ["TITLE", "build_groups", "chunk_time_summary", "evaluate_source", "run_eval"]
