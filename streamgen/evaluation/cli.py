"""`streamgen eval`: the non-learned checker over generated streams, one table per cache policy × sampler.

    streamgen eval --weights runs/x/embedded.safetensors --out runs/x/eval
    streamgen eval --weights W --policies window_sink ema_sink "window_sink:capacity_frames=12,sink_frames=3" \\
        --schedules exact timestep-slot --prompts all --frames 48 --switches 8 --long-frames 10000 --out DIR
    streamgen eval --model world --prompts 8 --out DIR      # ground truth through the same path: 100% by construction

What is measured (checker and thresholds: docs/world.md):

- Adherence. One stream per prompt (`--prompts all` = all 84 colour × shape × direction prompts; N = N of
  them, drawn with the seed), `--frames` frames each, from noise. Colour, shape and direction of every frame
  are scored against the prompt in force; the first chunk is warm-up and not counted.
- Switch latency. `--switches N` more streams whose prompt changes live at the chunk boundary nearest the
  middle (`Stream.set_prompt(at_frame=…)`); the kinds cycle colour-only, shape-only, direction-only, all.
  Median latency in frames and chunks per attribute, and per switch kind.
- Long stream (`--long-frames N`): one stream with the model's own policy and schedule; adherence,
  sharpness and mid fraction of the first vs the last 1,000 frames (or half the stream when shorter), and
  per-chunk time of the first vs the last 100 chunks (flatness: last / first = 1.0 is flat).

Policies: `NAME` or `NAME:KEY=VALUE,KEY=VALUE` (values in YAML). When NAME is the model's own policy, the
settings start from the model's (e.g. capacity_frames=9, sink_frames=0, rope=relative for the embedded model);
otherwise from the policy's reference defaults. The same seeds are used for every policy × schedule, so the
rows compare like with like.

Writes OUT/eval.json and OUT/eval.md (streamgen.world.report tables) and prints the Markdown.
Exit status: 0 done; 1 the report was written but some policy × schedule failed (listed in it);
2 bad arguments: unknown policy or setting, missing weights file (nothing written).

Wire it into streamgen/cli.py with `add_eval_parser(sub)`; it sets `func` to `cmd_eval`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import yaml

SWITCH_KINDS = ("colour", "shape", "direction", "all")
SCHEDULE_CHOICES = ("exact", "timestep-slot")
LONG_WINDOW_FRAMES = 1000     # first vs last frames of the long stream
LONG_WINDOW_CHUNKS = 100      # first vs last chunks for per-chunk time
TITLE = "streamgen eval: world checker per cache policy × sampler"

Timeline = list[tuple[int, str]]  # [(frame, prompt text), …] starting at frame 0


# ----------------------------------------------------------------------------------------------
# Arguments

@dataclass(frozen=True)
class PolicySpec:
    """A `--policies` item: `label` as given, the policy `name` and the settings written after the colon."""

    label: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)


def parse_policy(text: str) -> PolicySpec:
    """`NAME` or `NAME:KEY=VALUE,KEY=VALUE` (values parsed as YAML: 0, true, relative, …)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"policy {text!r}: expected NAME or NAME:KEY=VALUE,…")
    settings: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"policy {text!r}: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        settings[key.strip()] = yaml.safe_load(value)
    return PolicySpec(text, name, settings)


def _prompts_arg(text: str) -> int | str:
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a count, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a count must be ≥ 0, got {n}")
    return n


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {n}")
        return n
    return parse


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eval` to a `streamgen` subparsers object; the parser's `func(args)` returns the exit code."""
    p = subparsers.add_parser("eval", help="score generated streams with the world checker, per cache policy × sampler",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", choices=("embedded", "world"), default="embedded",
                       help="embedded: the shipped weights (default); world: rendered ground truth, the checker's "
                            "sanity baseline (policies and schedules are then labels only)")
    model.add_argument("--weights", type=Path, metavar="FILE", help="an embedded-model weights file (streamgen train's "
                                                                      "OUT/embedded.safetensors)")
    p.add_argument("--policies", nargs="+", metavar="NAME[:K=V,…]",
                   help="cache policies to compare (default: the model's own), e.g. window_sink ema_sink "
                        "window_sink:capacity_frames=12,sink_frames=3")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULE_CHOICES, default=["exact"],
                   help="few-step schedules to compare (default exact)")
    p.add_argument("--steps", type=float, nargs="+", metavar="N|T",
                   help="one integer: that many evenly spaced denoising steps from t=1000 (the model's own list when "
                        "the count matches; default: the model's, 4); several values: the timesteps themselves")
    p.add_argument("--prompts", type=_prompts_arg, default="all",
                   help="'all' (every colour × shape × direction, 84 streams) or N of them drawn with the seed")
    p.add_argument("--frames", type=_count(6), default=48, help="frames per stream (default 48)")
    p.add_argument("--switches", type=_count(0), default=8,
                   help="streams with a live prompt change per policy × schedule, cycling colour-only, shape-only, "
                        "direction-only, all (default 8)")
    p.add_argument("--long-frames", type=_count(0), default=0,
                   help="frames of one long stream with the model's own policy (0: none; e.g. 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_count(1), default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/eval.json and DIR/eval.md")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no Markdown on stdout")
    p.set_defaults(func=cmd_eval)
    return p


# ----------------------------------------------------------------------------------------------
# Stream sources: the model through the real Stream API, or rendered ground truth

@dataclass
class StreamResult:
    video: Any                   # uint8 [T, 3, H, W] (numpy)
    prompts: list[str]           # prompt in force per frame (follows the stream's acks)
    chunk_wall_s: list[float]    # per-chunk wall time
    chunk_cpu_s: list[float]     # per-chunk process CPU time


@dataclass(frozen=True)
class Combo:
    """One policy × schedule: `overrides` are StreamConfig fields (policy, policy_settings, schedule, steps)."""

    policy: str
    sampler: str
    overrides: dict[str, Any]


class ModelSource:
    """Streams of a model bundle through `Stream.next_chunk()` and the bundle's decoder, from noise."""

    def __init__(self, bundle, name: str) -> None:
        self.bundle, self.name = bundle, name
        self.chunk_frames = bundle.stream.chunk_frames
        self.default = bundle.stream

    def stream(self, timeline: Timeline, frames: int, seed: int, overrides: dict[str, Any],
               on_chunk: Callable[[int], None] = lambda n: None) -> StreamResult:
        from dataclasses import replace

        import torch

        from ..engine.stream import Stream

        config = replace(self.bundle.stream, seed=seed, **overrides)
        stream = Stream(self.bundle.dit, self.bundle.text_encoder, config, timeline[0][1])
        for frame, prompt in timeline[1:]:
            stream.set_prompt(prompt, at_frame=frame)
        decoder = self.bundle.decoder()
        # (first frame, prompt) as acknowledged. An ack names the frame its prompt lands at; a pipelined
        # schedule (timestep-slot) acks when a chunk enters the pipeline, before that chunk comes out.
        landed = [(0, timeline[0][1])]
        out, per_frame, wall, cpu = [], [], [], []
        done = 0
        while done < frames:
            w0, c0 = time.perf_counter(), time.process_time()
            chunk = stream.next_chunk()
            pixels = decoder.push(chunk.latents)[0]            # [F, H, W, 3] uint8
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
            for ack in chunk.acks:
                if ack.of == "prompt":
                    landed.append((ack.frame, next(p for f, p in reversed(timeline) if f <= ack.frame)))
            n = min(pixels.shape[0], frames - done)
            out.append(pixels[:n])
            per_frame += [next(p for f, p in reversed(landed) if f <= t)
                          for t in range(chunk.first_frame, chunk.first_frame + n)]
            done += n
            on_chunk(n)
        video = torch.cat(out).permute(0, 3, 1, 2).numpy()
        return StreamResult(video, per_frame, wall, cpu)


class WorldSource:
    """Rendered ground truth with the stream's timing rules: a prompt queued for frame f lands at the first
    chunk boundary ≥ f, the object starts at a seeded random token. The checker must score it at 100%."""

    name = "world (ground truth)"

    def __init__(self, chunk_frames: int = 3) -> None:
        from ..engine.stream import StreamConfig

        self.chunk_frames = chunk_frames
        self.default = StreamConfig(32, 32, chunk_frames=chunk_frames)

    def stream(self, timeline: Timeline, frames: int, seed: int, overrides: dict[str, Any],
               on_chunk: Callable[[int], None] = lambda n: None) -> StreamResult:
        import numpy as np

        from ..world import GRID, parse_prompt, render_stream

        c = self.chunk_frames
        lands = [(-(-f // c) * c, p) for f, p in timeline]
        texts = [next(p for f, p in reversed(lands) if f <= t) for t in range(frames)]
        rng = np.random.default_rng(seed)
        row, col = (int(v) for v in rng.integers(GRID, size=2))
        video, _ = render_stream([parse_prompt(t).prompt for t in texts], row, col, dtype=np.uint8)
        chunks = -(-frames // c)
        for i in range(chunks):
            on_chunk(min(c, frames - i * c))
        return StreamResult(video, texts, [0.0] * chunks, [0.0] * chunks)


# ----------------------------------------------------------------------------------------------
# What to stream

def prompt_items(count: int | str, seed: int) -> list[str]:
    """'all' → the 84 prompts in index order; N → N distinct prompts drawn with `seed` (N > 84: cycled)."""
    import numpy as np

    from ..world import all_prompts

    pool = [p.text() for p in all_prompts()]
    if count == "all":
        return pool
    order = np.random.default_rng(seed).permutation(len(pool)).tolist()
    return [pool[order[i % len(pool)]] for i in range(int(count))]


def switch_frame(frames: int, chunk_frames: int) -> int:
    """The chunk boundary nearest the middle, at least one chunk in."""
    return max(chunk_frames, chunk_frames * round(frames / (2 * chunk_frames)))


def switch_items(count: int, frames: int, chunk_frames: int, seed: int) -> list[tuple[str, Timeline]]:
    """(kind, timeline) per switch stream: kinds cycle colour, shape, direction, all; each changed attribute
    takes a different random value; the switch is queued at `switch_frame`."""
    import numpy as np

    from ..world import COLOURS, DIRECTIONS, SHAPES, Prompt

    values = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}
    rng = np.random.default_rng([seed, 1])
    at = switch_frame(frames, chunk_frames)
    out = []
    for i in range(count):
        kind = SWITCH_KINDS[i % len(SWITCH_KINDS)]
        p = Prompt(*(vals[int(rng.integers(len(vals)))] for vals in values.values()))
        changes = {}
        for attr in (values if kind == "all" else (kind,)):
            others = [v for v in values[attr] if v != getattr(p, attr)]
            changes[attr] = others[int(rng.integers(len(others)))]
        out.append((kind, [(0, p.text()), (at, p.replace(**changes).text())]))
    return out


def steps_from_args(steps: Sequence[float] | None, default: Sequence[float]) -> tuple[float, ...]:
    """None → the model's; one integer N → N evenly spaced from 1000 (the model's own list when N matches it);
    several values → those timesteps."""
    if not steps:
        return tuple(default)
    if len(steps) > 1:
        return tuple(float(s) for s in steps)
    n = steps[0]
    if n != int(n) or n < 1:
        raise ValueError(f"--steps with one value is a step count (a positive integer), got {n:g}")
    n = int(n)
    if n == len(default):
        return tuple(default)
    return tuple(1000.0 * (1 - i / n) for i in range(n))


def resolve_policies(specs: Sequence[PolicySpec], default) -> list[tuple[PolicySpec, dict[str, Any]]]:
    """Each spec with its full settings, validated by building the policy (unknown names list the known)."""
    from ..cache.policy import make_policy

    out = []
    for spec in specs:
        settings = {**(default.policy_settings if spec.name == default.policy else {}), **spec.settings}
        try:
            make_policy(spec.name, **settings)
        except TypeError as exc:  # an unknown setting
            raise ValueError(f"policy {spec.label!r}: {exc}") from None
        except ValueError as exc:
            raise ValueError(str(exc) if "unknown cache policy" in str(exc) else f"policy {spec.label!r}: {exc}") from None
        out.append((spec, settings))
    return out


# ----------------------------------------------------------------------------------------------
# Running and reporting

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


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{100 * v:+.1f} pp" if signed else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def render_markdown(doc: dict) -> str:
    from ..world.report import DEFAULT_COLUMNS, _latency_cell, markdown

    s = doc["settings"]
    groups = doc["groups"]
    columns = (*DEFAULT_COLUMNS, ("frames_per_s", "frames/s", "int"))
    text = markdown(groups, title=doc["title"], columns=columns) if groups else f"# {doc['title']}\n"
    lines = text.rstrip("\n").split("\n")
    # the settings go right under the title
    lines[1:1] = ["", (f"Model: {s['model']}. {s['prompt_streams']} prompt streams + {s['switch_streams']} switch "
                      f"streams of {s['frames']} frames per policy × sampler, steps {', '.join(f'{t:g}' for t in s['steps'])}, "
                      f"seed {s['seed']}, {s['threads']} thread(s); the first {s['chunk_frames']} frames of each stream "
                      f"are warm-up. Switches are queued at frame {s['switch_frame']} (a chunk boundary).")]
    lat_groups = [g for g in groups if g["switch_runs"]]
    if lat_groups:
        lines += ["", "## Switch latency per switch kind (all attributes right, 3 frames held)", ""]
        header = ["policy", "sampler", *(f"{k}-only" if k != "all" else "all three" for k in SWITCH_KINDS)]
        rows = [[g["policy"], g["sampler"], *(_latency_cell(g["latency_by_kind"][k]["prompt"]) for k in SWITCH_KINDS)]
                for g in lat_groups]
        lines += _table(header, rows)
    long = doc.get("long")
    if long:
        d = long["drift"] or {}
        settings = ", ".join(f"{k}={v}" for k, v in (long["policy_settings"] or {}).items())
        lines += ["", (f"## Long stream: {long['frames']} frames, policy {long['policy']}{f' ({settings})' if settings else ''}, "
                      f"{long['sampler']}, \"{long['prompt']}\""), ""]
        keys = ("colour", "shape", "direction", "all", "still")
        header = ["frames", *keys, "sharpness", "mid"]
        rows = []
        for name, w, signed in ((f"first {long['window_frames']}", d.get("first"), False),
                                (f"last {long['window_frames']}", d.get("last"), False),
                                ("Δ last − first", d.get("delta"), True)):
            if w is None:
                continue
            rows.append([name, *(_pct(w[k], signed) for k in keys),
                         _num(w["sharpness"], "+.4f" if signed else ".4f"), _num(w["mid_fraction"], "+.3f" if signed else ".3f")])
        lines += _table(header, rows)
        ct = long["chunk_time"]
        lines += ["", (f"Per-chunk time, median of the first vs the last {ct['window_chunks']} of {ct['chunks']} chunks "
                      "(flat = 1.00):"), ""]
        lines += _table(["clock", "first (ms)", "last (ms)", "last / first"],
                        [[name, _num(ct[name]["first_ms"], ".1f"), _num(ct[name]["last_ms"], ".1f"),
                          _num(ct[name]["ratio"], ".2f")] for name in ("wall", "cpu")])
        if long.get("segments"):
            lines += ["", "Per segment:", ""]
            lines += _table(["frames", "all", "colour", "direction", "sharpness", "mid"],
                            [[f"{g['start']}–{g['end']}", _pct(g["all"]), _pct(g["colour"]), _pct(g["direction"]),
                              _num(g["sharpness"], ".4f"), _num(g["mid_fraction"])] for g in long["segments"]])
    if doc["failures"]:
        lines += ["", "## Failed policy × sampler combinations", ""]
        lines += _table(["policy", "sampler", "error"], [[f["policy"], f["sampler"], f["error"]] for f in doc["failures"]])
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out: Path) -> tuple[Path, Path, str]:
    from ..world.report import _json_safe

    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(doc)
    json_path, md_path = out / "eval.json", out / "eval.md"
    json_path.write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n")
    md_path.write_text(md)
    return json_path, md_path, md


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


def load_source(args: argparse.Namespace):
    if args.model == "world" and args.weights is None:
        return WorldSource()
    from ..bundles.embedded import WEIGHTS_PATH, embedded_bundle

    path = args.weights or WEIGHTS_PATH
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}" + (
            "" if args.weights else " (no embedded weights are shipped yet; pass --weights FILE)")
            + "; train one with `streamgen train --out DIR` and pass --weights DIR/embedded.safetensors")
    return ModelSource(embedded_bundle(path), f"embedded ({path})")


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        specs = [parse_policy(p) for p in args.policies or []]
        import torch

        torch.set_num_threads(args.threads)
        source = load_source(args)
        doc = evaluate_source(source, specs, args.schedules, steps=args.steps, prompts=args.prompts, frames=args.frames,
                              switches=args.switches, long_frames=args.long_frames, seed=args.seed,
                              threads=args.threads, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"streamgen eval: error: {exc}", file=sys.stderr)
        return 2
    json_path, md_path, md = write_outputs(doc, args.out)
    if not args.quiet:
        print(md)
    print(f"wrote {json_path} and {md_path} ({doc['settings']['seconds']:.0f} s)")
    if doc["failures"]:
        print(f"streamgen eval: {len(doc['failures'])} policy × sampler combination(s) failed; see {md_path}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m streamgen.evaluation.cli …` = `streamgen eval …` (before it is wired into streamgen/cli.py)."""
    parser = argparse.ArgumentParser(prog="streamgen")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Combo", "ModelSource", "PolicySpec", "WorldSource", "add_eval_parser", "build_groups", "cmd_eval",
           "evaluate_source", "parse_policy", "prompt_items", "render_markdown", "run_eval", "switch_items",
           "write_outputs"]
