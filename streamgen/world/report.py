"""Checker reports: per-run metric dicts → tables per cache policy × sampler, in JSON and Markdown.

A run dict is `checker.clip_metrics(...)` plus identifying keys, at least `policy` and `sampler`
(anything else — prompt, steps, seed, frames/s, `segments` from checker.segment_metrics — is kept):

    runs = [{"policy": "window_sink", "sampler": "few_step", "prompt": "...", **clip_metrics(frames, prompts)}, ...]
    write_report(runs, "out/world_eval.json", "out/world_eval.md")

Groups average every numeric leaf of their runs (nested keys joined with "."; None skipped) and pool
the runs' switch events, so latency medians are over all switches of the group, not means of medians.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .checker import LATENCY_ATTRIBUTES, summarize_latency

GROUP_KEYS: tuple[str, ...] = ("policy", "sampler")
MISSING = "-"

# (metric key in the group's flat means, column title, kind) for the main table
DEFAULT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("frames", "frames", "int"),
    ("rates.colour", "colour", "pct"),
    ("rates.shape", "shape", "pct"),
    ("rates.direction", "direction", "pct"),
    ("rates.colour_direction", "colour+dir", "pct"),
    ("rates.all", "all", "pct"),
    ("rates.still", "still", "pct"),
    ("quality.sharpness", "sharpness", "num"),
    ("quality.mid_fraction", "mid", "num"),
    ("drift.delta.all", "Δall (drift)", "pct_delta"),
    ("drift.delta.mid_fraction", "Δmid (drift)", "num_delta"),
)

PIVOTS: tuple[tuple[str, str, str], ...] = (
    ("rates.all", "All-attribute adherence (colour+shape+direction) after warm-up", "pct"),
    ("rates.colour_direction", "Colour+direction adherence after warm-up", "pct"),
    ("quality.mid_fraction", "Mid fraction (0 = clean render, ~0.9 = noise)", "num"),
    ("latency.prompt.median_frames", "Prompt switch latency, median frames (all attributes, 3 frames held)", "num"),
)


def _is_num(v: Any) -> bool:
    """A finite int/float, or a bool (counted as 0/1)."""
    if isinstance(v, bool):
        return True
    return isinstance(v, (int, float)) and math.isfinite(v)


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict ("a.b.c" keys); bools count as 0/1; lists and strings are skipped."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalar
            v = v.item()
            if _is_num(v):
                out[key] = float(v)
        elif _is_num(v):
            out[key] = float(v)
    return out


def _group_value(run: dict, key: str) -> str:
    v = run.get(key)
    return MISSING if v is None else str(v)


def aggregate(runs: Sequence[dict], group_keys: Sequence[str] = GROUP_KEYS) -> list[dict]:
    """One dict per group (first-appearance order): the group keys, `runs`, `metrics` (means of
    numeric leaves, without switch events and segments), `latency` (pooled switch events,
    checker.summarize_latency) and `segments` (per-segment means, when runs carry `segments`)."""
    groups: dict[tuple[str, ...], list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(_group_value(run, k) for k in group_keys), []).append(run)
    out = []
    for key, members in groups.items():
        sums: dict[str, list[float]] = {}
        for run in members:
            flat = flatten({k: v for k, v in run.items()
                            if k not in ("switch_events", "segments", "switch_latency", *group_keys)})
            for k, v in flat.items():
                sums.setdefault(k, []).append(v)
        metrics = {k: sum(v) / len(v) for k, v in sums.items()}
        events = [e for run in members for e in run.get("switch_events", ()) or ()]
        seg_runs = [run["segments"] for run in members if run.get("segments")]
        segments = None
        if seg_runs:
            n = max(len(s) for s in seg_runs)
            segments = []
            for i in range(n):
                rows = [s[i] for s in seg_runs if i < len(s)]
                acc: dict[str, list[float]] = {}
                for r in rows:
                    for k, v in flatten(r).items():
                        acc.setdefault(k, []).append(v)
                segments.append({k: sum(v) / len(v) for k, v in acc.items()})
        out.append({**dict(zip(group_keys, key)), "runs": len(members), "metrics": metrics,
                    "latency": summarize_latency(events), "segments": segments})
    return out


def _fmt(v: Optional[float], kind: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "pct_delta":
        return f"{100 * v:+.1f} pp"
    if kind == "int":
        return f"{v:.0f}"
    if kind == "num_delta":
        return f"{v:+.3f}"
    return f"{v:.3f}"


def _group_metric(g: dict, key: str) -> Optional[float]:
    if key.startswith("latency."):
        _, attr, field = key.split(".", 2)
        return g["latency"].get(attr, {}).get(field)
    return g["metrics"].get(key)


def _latency_cell(summary: dict) -> str:
    if not summary or not summary["switches"]:
        return "–"
    med = summary["median_frames"]
    cell = "never" if med is None else f"{med:g} f / {summary['median_chunks']:g} ch (max {summary['max_frames']})"
    if summary["never"] and med is not None:
        cell += f", never {summary['never']}/{summary['switches']}"
    return cell


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown(groups: Sequence[dict], *, title: str = "World checker report",
             group_keys: Sequence[str] = GROUP_KEYS,
             columns: Sequence[tuple[str, str, str]] = DEFAULT_COLUMNS) -> str:
    lines = [f"# {title}", "",
             "Rates are shares of frames after the warm-up that match the prompt in force (checker: "
             "`streamgen.world.checker`, contract: docs/world.md). Switch latency: frames (f) and chunk "
             "boundaries (ch) from the switch until the new value holds for 3 consecutive frames; median "
             "over all switches of the group (max in brackets).", ""]
    lines.append("## Adherence and quality per " + " × ".join(group_keys))
    lines.append("")
    header = [*group_keys, "runs", *(c[1] for c in columns)]
    rows = [[*(g[k] for k in group_keys), str(g["runs"]), *(_fmt(_group_metric(g, key), kind) for key, _, kind in columns)]
            for g in groups]
    lines += _table(header, rows)
    lines += ["", "## Switch latency per " + " × ".join(group_keys), ""]
    header = [*group_keys, "switches", *LATENCY_ATTRIBUTES]
    rows = [[*(g[k] for k in group_keys), str(g["latency"]["prompt"]["switches"]),
             *(_latency_cell(g["latency"][a]) for a in LATENCY_ATTRIBUTES)] for g in groups]
    lines += _table(header, rows)

    if len(group_keys) == 2:
        rk, ck = group_keys
        row_vals = list(dict.fromkeys(g[rk] for g in groups))
        col_vals = list(dict.fromkeys(g[ck] for g in groups))
        by = {(g[rk], g[ck]): g for g in groups}
        for key, title_, kind in PIVOTS:
            lines += ["", f"## {title_}", ""]
            rows = [[r, *(_fmt(_group_metric(by[(r, c)], key), kind) if (r, c) in by else "" for c in col_vals)]
                    for r in row_vals]
            lines += _table([f"{rk} \\ {ck}", *col_vals], rows)

    seg_groups = [g for g in groups if g.get("segments")]
    if seg_groups:
        lines += ["", "## Per segment (all-attribute adherence / mid fraction)", ""]
        n = max(len(g["segments"]) for g in seg_groups)
        spans = []
        for i in range(n):
            s = next(g["segments"][i] for g in seg_groups if i < len(g["segments"]))
            spans.append(f"{s.get('start', 0):.0f}–{s.get('end', 0):.0f}")
        rows = []
        for g in seg_groups:
            cells = [f"{_fmt(s.get('all'), 'pct')} / {_fmt(s.get('mid_fraction'), 'num')}" for s in g["segments"]]
            rows.append([*(g[k] for k in group_keys), *cells, *([""] * (n - len(cells)))])
        lines += _table([*group_keys, *spans], rows)
    return "\n".join(lines) + "\n"


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "tolist"):  # numpy arrays and scalars
        return _json_safe(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def write_report(runs: Sequence[dict], json_path: str | Path, md_path: str | Path, *,
                 title: str = "World checker report", group_keys: Sequence[str] = GROUP_KEYS) -> dict:
    """Aggregate `runs` per group and write both files (parents created). Returns the JSON document:
    {"title", "group_keys", "groups": aggregate(...), "runs": the runs as given (JSON-safe)}."""
    groups = aggregate(runs, group_keys)
    doc = _json_safe({"title": title, "group_keys": list(group_keys), "groups": groups, "runs": list(runs)})
    json_path, md_path = Path(json_path), Path(md_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    md_path.write_text(markdown(groups, title=title, group_keys=group_keys))
    return doc


__all__ = ["DEFAULT_COLUMNS", "GROUP_KEYS", "aggregate", "flatten", "markdown", "write_report"]
