"""`streamgen eval --model embedded-avatar`: the avatar model's table (streamgen/train/avatar_eval.py scores the
streams) plus drift over one long stream, as Markdown."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..avatar_world import SAMPLES_PER_FRAME, score_clip
from ..train.avatar_eval import WARM_UP_FRAMES, run_stream


def evaluate_long(bundle, frames: int, seed: int = 0, window: int = 1000) -> dict[str, Any]:
    """Drift: one stream of `frames` frames; the scores of its first and last `window` frames side by side."""
    run = run_stream(bundle, np.random.default_rng([seed, 0x10C]), frames)
    blinks = run.blinks
    window = min(window, frames // 2)
    spans = {"first": (WARM_UP_FRAMES, window), "last": (frames - window, frames)}
    return {"frames": frames, "frames_per_s": run.frames_per_s, **{
        name: score_clip(run.video[a:b], run.samples[a * SAMPLES_PER_FRAME:b * SAMPLES_PER_FRAME], run.identity,
                         blinks[a:b]) for name, (a, b) in spans.items()}}


COLUMNS = (("lipsync_corr", "lip-sync r", "{:.2f}"), ("lag_frames", "lag (frames)", "{:+.0f}"),
           ("mouth_speech", "mouth in speech", "{:.2f}"), ("mouth_silence", "mouth in silence", "{:.2f}"),
           ("identity", "identity", "{:.0%}"), ("eyes_match", "eyes", "{:.0%}"), ("jitter", "jitter", "{:.4f}"))


def report_markdown(doc: dict[str, Any]) -> str:
    """The eval table: the pooled summary, then the drift rows when a long stream was run."""
    s = doc["summary"]
    lines = [f"# embedded-avatar eval ({s['runs']} streams × {doc['settings']['frames']} frames, seed "
             f"{doc['settings']['seed']})", "",
             r"| lip-sync r | lag median | \|lag\| ≤ 1 | mouth in speech | mouth in silence | identity | colour | "
             "shape | eyes | jitter | frames/s |", "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {s['lipsync_corr']:.2f} | {s['lag_frames_median']:+.0f} | {s['lag_within_1']:.0%} | {s['mouth_speech']:.2f} | "
             f"{s['mouth_silence']:.2f} | {s['identity']:.0%} | {s['colour_match']:.0%} | {s['shape_match']:.0%} | "
             f"{s['eyes_match']:.0%} | {s['jitter']:.4f} | {s['frames_per_s']:.0f} |"]
    if doc.get("long"):
        long = doc["long"]
        lines += ["", f"Drift over one {long['frames']:,}-frame stream ({long['frames_per_s']:.0f} frames/s):", "",
                  "| frames | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        for name in ("first", "last"):
            row = long[name]
            lines.append(f"| {name} {row['frames']} | " + " | ".join(fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
