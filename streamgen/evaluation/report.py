"""`streamgen eval`'s output: the report document as Markdown (eval.md, also printed) and JSON (eval.json)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .plan import SWITCH_KINDS


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


def write_report(doc: dict, md: str, out: Path, stem: str) -> tuple[Path, Path, str]:
    """`doc` as OUT/STEM.json and its Markdown `md` as OUT/STEM.md: (json path, md path, md)."""
    from ..world.report import _json_safe

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n")
    md_path.write_text(md)
    return json_path, md_path, md


def write_outputs(doc: dict, out: Path) -> tuple[Path, Path, str]:
    return write_report(doc, render_markdown(doc), out, "eval")


__all__ = ["render_markdown", "write_outputs", "write_report"]
