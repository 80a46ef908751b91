"""Why the embedded model's shapes fail: the world checker's shape verdicts broken down by prompted shape,
by where the object is (inside the frame or across a wrap seam of the torus), by chunk, by schedule, with
the ground truth through the same checker as the control (findings: docs/embedded_model.md).

    python -m streamgen.evaluation.shape_diagnosis --seeds 7 --seconds 3 --out DIR       # about 3 min, 1 thread
    python -m streamgen.evaluation.shape_diagnosis --seeds 0 --seconds 6 --schedules exact --teacher-forced 0 \
        --no-issue-cases --out DIR                # the streams of `streamgen eval --prompts all --frames 48`
    python -m streamgen.evaluation.shape_diagnosis --seeds 7 --same-seed --out DIR    # one seed for every prompt

Streams come from `evaluation.sources` (the real `Stream` API and decoder, from noise, as `streamgen eval` and
`streamgen render` run them: the seed is the stream's noise seed). Prompt i runs with seed + i for each seed, as
`streamgen eval` does, or with the seed itself (`--same-seed`, like a batch of one-off renders); the issue's two
renders run at seed 7 in any case. Every frame is judged by `streamgen.world.checker.analyze` / `score` alone.
What is added here is bookkeeping, no second shape checker:

- Position. The token position (row, col) where the world would put the prompted object to explain the frame:
  the best IoU of the prompted shape over the 64 token positions (`world.shape_masks`), tied frames resolved
  along the world's motion (a Viterbi path over the stream that pays 0.05 IoU for any jump off the prompt's
  one-token-per-frame track). An object whose 3×3-token box crosses row 7→0 is on the top/bottom seam, one
  crossing column 7→0 on the left/right seam, both: corner; otherwise inside (44 % of positions are on a seam).
  Relative to the motion: crossing a seam (the one the motion carries it through, 2 frames in 8), riding a
  seam (parallel to the motion: straddled for as long as it moves that way), corner (both), inside. The first
  chunk fixes the coordinate across the motion for the whole stream ("Where the first chunk puts the object",
  with where phase 2's first-chunk target, `train.data.detect_positions`, would put it).
- Coverage against that ground-truth object: precision (share of the drawn pixels inside it), recall of its
  main part (the half, or quadrant, of the frame that holds its anchor) and of its wrapped part (the pixels on
  the far side of the seam; inside objects have none).
- Failure cause of a wrong frame: nothing drawn (area below the checker's range), too big, wrapped part
  missing (on a seam, main part ≥ 70 % drawn, wrapped part < 50 %), another shape (the checker decodes one),
  blob (no template reaches the checker's IoU 0.6).
- Controls through the same checker: the world's own frames for the same prompt and seed
  (`sources.WorldSource`, render.py), and the world's object re-rendered at every position found in the model's
  frames ("world twin"). Both must score 100 % in every cell, or the checker is the problem.
- Teacher-forced chunks: two ground-truth chunks as clean context, the model generates the third with the
  stream's own few-step sampler (full-sequence forward with the training mask, `ChunkMaskAttention`), for every
  shape at all 64 positions (`--teacher-forced`); plus the flow-matching loss at the sampler's four levels on
  the same clips, and the x̂0 error on the object's main and wrapped parts. No exposure bias, no first chunk.

Writes OUT/shape_diagnosis.json and OUT/shape_diagnosis.md and prints the Markdown. Rates "after warm-up" skip
the first chunk, as `streamgen eval` does; the per-chunk table shows it.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .plan import prompt_items
from .report import _num, _pct, _table, write_report

CLASSES = ("inside", "top/bottom seam", "left/right seam", "corner")
RELATIONS = ("inside", "crossing a seam", "riding a seam", "corner")  # the seams relative to the motion
FAILURES = ("nothing drawn", "too big", "wrapped part missing", "other shape", "blob")
ISSUE_PROMPTS = ("a yellow square moving left", "a cyan triangle moving up")
ISSUE_SEED = 7
JUMP_COST = 0.05          # IoU a position path pays for leaving the prompt's track (ties follow the motion)
WRAPPED_MISSING = (0.7, 0.5)  # main part recall ≥ this and wrapped part recall < this → "wrapped part missing"
TITLE = "Shape diagnosis: the world checker's shape verdicts by shape, position, chunk and schedule"


# ------------------------------------------------------------------------------------------------
# Geometry: where the world would put the object, and its parts across a seam

def seam_class(row: int, col: int) -> str:
    """Position class of an object anchored at token (row, col): its 3×3-token box crosses a wrap seam or not."""
    from ..world import GRID

    r, c = row in (0, GRID - 1), col in (0, GRID - 1)
    return CLASSES[3] if r and c else CLASSES[1] if r else CLASSES[2] if c else CLASSES[0]


def seam_relation(row: int, col: int, direction: str) -> str:
    """RELATIONS entry: a seam the motion carries the object through (crossing, a few frames) or one parallel
    to the motion that the object straddles for as long as it moves that way (riding), both (corner), none."""
    from ..world import GRID

    on_row, on_col = row in (0, GRID - 1), col in (0, GRID - 1)
    riding, crossing = (on_row, on_col) if direction in ("left", "right") else (on_col, on_row)
    return RELATIONS[3] if riding and crossing else RELATIONS[2] if riding else RELATIONS[1] if crossing else RELATIONS[0]


@lru_cache(maxsize=None)
def _anchor_side(row: int, col: int) -> np.ndarray:
    """bool [32, 32]: the half of the frame (quadrant for a corner) that holds the anchor of an object at
    (row, col) on the seams it straddles; the whole frame for an inside object."""
    from ..world import FRAME_SIZE, GRID, TOKEN_SIZE

    near = np.ones((FRAME_SIZE, FRAME_SIZE), bool)
    low = np.arange(FRAME_SIZE) < FRAME_SIZE // 2
    if row in (0, GRID - 1):
        near &= (low == (TOKEN_SIZE * row < FRAME_SIZE // 2))[:, None]
    if col in (0, GRID - 1):
        near &= (low == (TOKEN_SIZE * col < FRAME_SIZE // 2))[None, :]
    return near


@lru_cache(maxsize=None)
def object_parts(shape: str, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """(main, wrapped) bool [32, 32] of the world's object at (row, col): main = its pixels on the anchor's side
    of the seams (`_anchor_side`), wrapped = the rest (empty for an inside object)."""
    from ..world import SHAPES, shape_masks

    mask = shape_masks()[SHAPES.index(shape), row, col]
    near = _anchor_side(row, col)
    return mask & near, mask & ~near


def fit_positions(fg: np.ndarray, shape: str, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """Token positions [T, 2] of the prompted object along a stream of foreground masks fg [T, 32, 32], and
    their IoU [T]: the most IoU over the stream's path, with JUMP_COST per frame that leaves the prompt's
    one-token-per-frame track (so ties and empty frames follow the world's motion)."""
    from ..world import DIRECTION_DELTAS, GRID, SHAPES, SPEED_TOKENS, shape_masks

    masks = shape_masks()[SHAPES.index(shape)].reshape(GRID * GRID, -1).astype(np.float64)   # [64, 1024]
    f = fg.reshape(len(fg), -1).astype(np.float64)
    inter = f @ masks.T
    union = f.sum(1, keepdims=True) + masks.sum(1)[None] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)                             # [T, 64]
    dr, dc = (d * SPEED_TOKENS for d in DIRECTION_DELTAS[direction])
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    came_from = ((rows - dr) % GRID) * GRID + (cols - dc) % GRID                              # p − one step
    best, back = iou[0].copy(), np.zeros(iou.shape, dtype=np.int64)
    for t in range(1, len(iou)):
        jump, on_track = best.max() - JUMP_COST, best[came_from]
        back[t] = np.where(on_track >= jump, came_from, int(best.argmax()))
        best = iou[t] + np.maximum(on_track, jump)
    path = np.zeros(len(iou), dtype=np.int64)
    path[-1] = int(best.argmax())
    for t in range(len(iou) - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return np.stack(np.divmod(path, GRID), 1), iou[np.arange(len(iou)), path]


# ------------------------------------------------------------------------------------------------
# Per-frame records

def frame_records(video: Any, prompts: Sequence[str], **keys: Any) -> list[dict]:
    """One dict per frame: the checker's verdict on the prompt in force (shape, colour, direction), the world's
    position of the prompted object, the coverage of its parts and, for a wrong shape, the failure cause.
    `prompts` holds one constant prompt per frame (no switches). `keys` are copied into every record."""
    from ..world import parse_prompt
    from ..world.checker import AREA_RANGE, FG_THRESHOLD, analyze, as_frames, score

    x = as_frames(video)
    a = analyze(x)
    s = score(a, list(prompts))
    prompt = parse_prompt(prompts[0]).prompt
    fg = x.max(axis=1) > FG_THRESHOLD
    pos, fit = fit_positions(fg, prompt.shape, prompt.direction)
    out = []
    for t in range(len(a)):
        row, col = (int(v) for v in pos[t])
        main, wrapped = object_parts(prompt.shape, row, col)
        area = int(a.area[t])
        inter_main, inter_wrapped = int((fg[t] & main).sum()), int((fg[t] & wrapped).sum())
        rec = {**keys, "t": t, "shape": prompt.shape, "read": a.shape[t], "ok": bool(s.shape_ok[t]),
               "colour_ok": bool(s.colour_ok[t]), "direction_ok": bool(s.direction_ok[t]) if t else None,
               "area": area, "row": row, "col": col, "position": seam_class(row, col),
               "relation": seam_relation(row, col, prompt.direction), "fit_iou": float(fit[t]),
               "precision": (inter_main + inter_wrapped) / area if area else None,
               "recall_main": inter_main / int(main.sum()),
               "recall_wrapped": inter_wrapped / int(wrapped.sum()) if wrapped.any() else None}
        rec["failure"] = None if rec["ok"] else failure_cause(rec, AREA_RANGE)
        out.append(rec)
    return out


def failure_cause(rec: dict, area_range: tuple[int, int]) -> str:
    """FAILURES entry of a frame whose shape is wrong."""
    if rec["area"] < area_range[0]:
        return "nothing drawn"
    if rec["area"] > area_range[1]:
        return "too big"
    if (rec["recall_wrapped"] is not None and rec["recall_main"] >= WRAPPED_MISSING[0]
            and rec["recall_wrapped"] < WRAPPED_MISSING[1]):
        return "wrapped part missing"
    return "other shape" if rec["read"] is not None else "blob"


def world_twin(records: Sequence[dict], prompt: str) -> np.ndarray:
    """uint8 [T, 3, 32, 32]: the world's prompted object at each position found in a stream's frames."""
    from ..world import Prompt, WorldState, parse_prompt, render_states

    p: Prompt = parse_prompt(prompt).prompt
    return render_states([WorldState(p, r["row"], r["col"]) for r in records], dtype=np.uint8)


def with_seams_cut(video: np.ndarray, positions: Sequence[tuple[int, int]]) -> np.ndarray:
    """A negative control: ground-truth frames [T, 3, 32, 32] of objects at token `positions` with everything
    beyond the seams removed (the object "drawn in part", the issue's defect); inside objects are unchanged."""
    out = np.array(video, copy=True)
    for frame, (row, col) in zip(out, positions):
        frame[:, ~_anchor_side(int(row), int(col))] = 0
    return out


# ------------------------------------------------------------------------------------------------
# Streams and teacher-forced chunks

def stream_records(source, prompts: Sequence[str], seeds: Sequence[int], frames: int, schedules: Sequence[str],
                   tick: Callable[[int], None] = lambda n: None, case: str = "all prompts",
                   offset: bool = True) -> tuple[list[dict], list[dict]]:
    """Model streams (per schedule), the world's frames for the same prompt and seed, and the world twin of every
    model stream → (frame records, one summary per stream). Prompt i runs with seed + i for each seed (as
    `streamgen eval` does: the prompts do not share one noise draw), or with the seed itself (offset False)."""
    import torch

    from ..bundles.embedded import frames_to_latents
    from ..train.data import detect_positions
    from ..world import parse_prompt
    from .sources import WorldSource

    world = WorldSource(source.chunk_frames)
    records, streams = [], []
    c = source.chunk_frames
    for i, prompt in enumerate(prompts):
        for seed in (base + i if offset else base for base in seeds):
            truth = world.stream([(0, prompt)], frames, seed, {})
            recs = frame_records(truth.video, truth.prompts, source="world", schedule="–", prompt=prompt, seed=seed,
                                 case=case)
            records += recs
            for schedule in schedules:
                result = source.stream([(0, prompt)], frames, seed, {"schedule": schedule}, tick)
                keys = {"schedule": schedule, "prompt": prompt, "seed": seed, "case": case}
                mine = frame_records(result.video, result.prompts, source="model", **keys)
                twin = frame_records(world_twin(mine, prompt), result.prompts, source="world twin", **keys)
                records += mine + twin
                first = [r["ok"] for r in mine[:c]]
                teacher, found = detect_positions(frames_to_latents(torch.from_numpy(result.video[:1])))
                moving = parse_prompt(prompt).prompt.direction
                cross = [r["row"] if moving in ("left", "right") else r["col"] for r in mine[c:]] or [mine[0]["row"]]
                streams.append({**keys, "shape": mine[0]["shape"], "direction": moving, "frames": len(mine),
                                "start": [mine[0]["row"], mine[0]["col"]],
                                "cross_axis": int(np.bincount(cross).argmax()),
                                "teacher_start": [int(v) for v in teacher[0]] if found[0] else None,
                                "shape_all": float(np.mean([r["ok"] for r in mine])),
                                "shape_after_warmup": float(np.mean([r["ok"] for r in mine[c:]])) if len(mine) > c else None,
                                "first_chunk_ok": sum(first) * 2 > len(first),
                                "positions": sorted({r["position"] for r in mine})})
    return records, streams


def teacher_forced_clips(per_shape: int, seed: int) -> list[tuple[Any, int, int]]:
    """(prompt, row, col) per clip: the target chunk's first frame at `per_shape` of the 64 token positions per
    shape (all 64, seam and inside alike, at the default), colours and directions cycled."""
    from ..world import COLOURS, DIRECTIONS, GRID, SHAPES, Prompt

    order = np.random.default_rng([seed, 2]).permutation(GRID * GRID)[:per_shape]
    return [(Prompt(COLOURS[(3 * i + s) % len(COLOURS)], shape, DIRECTIONS[(i + s) % len(DIRECTIONS)]), *divmod(int(p), GRID))
            for s, shape in enumerate(SHAPES) for i, p in enumerate(order)]


def teacher_forced(bundle, clips: Sequence[tuple[Any, int, int]], seed: int, batch: int = 32,
                   tick: Callable[[int], None] = lambda n: None) -> tuple[list[dict], list[dict]]:
    """Two ground-truth chunks as clean context, the third generated by the model with the stream's few-step
    sampler; and the flow-matching loss on the same clips at the sampler's levels.
    → (frame records of the generated chunks, loss records per clip frame)."""
    import torch

    from ..bundles.embedded import frames_to_latents, latents_to_frames
    from ..models.decoders import to_uint8
    from ..sampling.schedule import FlowSchedule
    from ..train.attention import ChunkMaskAttention
    from ..world import DIRECTION_DELTAS, GRID, prompt_tokens, render_stream

    cfg = bundle.stream
    c = cfg.chunk_frames
    ctx, frames = 2 * c, 3 * c
    schedule = FlowSchedule(cfg.shift)
    steps = schedule.step_list(list(cfg.steps), cfg.warp_steps)
    dit, text = bundle.dit, bundle.text_encoder
    gen = torch.Generator().manual_seed(seed)
    records, losses = [], []
    for lo in range(0, len(clips), batch):
        part = clips[lo:lo + batch]
        videos = []
        for prompt, row, col in part:
            dr, dc = DIRECTION_DELTAS[prompt.direction]
            start = ((row - ctx * dr) % GRID, (col - ctx * dc) % GRID)   # frame `ctx` (the target's first) at (row, col)
            videos.append(render_stream([prompt] * frames, *start)[0])
        x0 = frames_to_latents(torch.from_numpy(np.stack(videos)))                       # [B, 9, 3, 32, 32]
        tokens = torch.tensor([prompt_tokens(p) for p, _, _ in part])
        attn = ChunkMaskAttention(dit.rope, c, list(range(frames // c)))
        with torch.no_grad():
            cross = dit.cross_kv(text(tokens))

            def flow(x, t_last):
                t = torch.zeros(x.shape[:2])
                t[:, ctx:] = t_last
                return dit(x.transpose(1, 2), t, cross, attn).transpose(1, 2), t

            x = x0.clone()
            x[:, ctx:] = torch.randn(x[:, ctx:].shape, generator=gen)
            for k, tk in enumerate(steps):                                               # the stream's sampler
                v, t = flow(x, tk)
                est = schedule.to_x0(x, v, t)[:, ctx:]
                x[:, ctx:] = est if k + 1 == len(steps) else schedule.add_noise(
                    est, torch.randn(est.shape, generator=gen), torch.full_like(t[:, ctx:], steps[k + 1]))
            out = to_uint8(latents_to_frames(x[:, ctx:])).permute(0, 1, 4, 2, 3).numpy()  # [B, 3, 3, 32, 32]
            err = {k: np.zeros((len(part), c)) for k in ("main", "wrapped", "share")}
            vloss = np.zeros((len(part), c))
            for tk in steps:                                                              # the training loss
                noise = torch.randn(x0[:, ctx:].shape, generator=gen)
                xt = x0.clone()
                xt[:, ctx:] = schedule.add_noise(x0[:, ctx:], noise, torch.full((len(part), c), tk))
                v, t = flow(xt, tk)
                vloss += (v[:, ctx:] - (noise - x0[:, ctx:])).pow(2).mean((2, 3, 4)).numpy() / len(steps)
                e = (schedule.to_x0(xt, v, t)[:, ctx:] - x0[:, ctx:]).pow(2).sum(2).numpy()  # [B, 3, 32, 32]
                for b, (prompt, row, col) in enumerate(part):
                    dr, dc = DIRECTION_DELTAS[prompt.direction]
                    for j in range(c):
                        main, wrapped = object_parts(prompt.shape, (row + j * dr) % GRID, (col + j * dc) % GRID)
                        err["main"][b, j] += e[b, j][main].mean() / len(steps)
                        err["wrapped"][b, j] += (e[b, j][wrapped].mean() if wrapped.any() else np.nan) / len(steps)
                        err["share"][b, j] += e[b, j][wrapped].sum() / max(e[b, j].sum(), 1e-12) / len(steps)
        for b, (prompt, row, col) in enumerate(part):
            recs = frame_records(np.concatenate([videos[b][:ctx] * 255, out[b]]).astype(np.uint8), [prompt.text()] * frames,
                                 source="teacher-forced", schedule="exact", prompt=prompt.text(), seed=seed,
                                 case="teacher-forced")[ctx:]
            dr, dc = DIRECTION_DELTAS[prompt.direction]
            for j, r in enumerate(recs):
                truth = (row + j * dr) % GRID, (col + j * dc) % GRID
                found = (r["row"], r["col"]) == truth
                r.update(position=seam_class(*truth), relation=seam_relation(*truth, prompt.direction))  # known here
                losses.append({"shape": prompt.shape, "position": seam_class(*truth), "v_loss": float(vloss[b, j]),
                               "x0_err_main": float(err["main"][b, j]),
                               "x0_err_wrapped": None if np.isnan(err["wrapped"][b, j]) else float(err["wrapped"][b, j]),
                               "wrapped_share": float(err["share"][b, j]),
                               "fit_is_truth": found})
            records += recs
        tick(len(part) * c)
    return records, losses


# ------------------------------------------------------------------------------------------------
# Tables

def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _cell(rs: Sequence[dict], key: str = "ok") -> dict:
    return {"n": len(rs), "rate": _mean([float(r[key]) for r in rs if r[key] is not None])}


def _where(rs: Sequence[dict], **match: Any) -> list[dict]:
    return [r for r in rs if all(r.get(k) == v for k, v in match.items())]


def build_tables(records: Sequence[dict], streams: Sequence[dict], losses: Sequence[dict], schedules: Sequence[str],
                 chunk_frames: int, frames: int) -> dict:
    """Every table of the report as JSON-able lists of rows (rates in [0, 1], n = frames counted)."""
    from ..world import SHAPES

    c = chunk_frames
    main = [r for r in records if r["case"] == "all prompts"]
    late = [r for r in main if r["t"] >= c]                       # after warm-up, as `streamgen eval` counts
    rows_src = [("model", s) for s in schedules] + [("world", "–")] + [("world twin", s) for s in schedules]
    t: dict[str, Any] = {}
    t["overview"] = [{"source": src, "schedule": sch, "frames": len(_where(main, source=src, schedule=sch)),
                      "shape_all": _cell(_where(main, source=src, schedule=sch))["rate"],
                      "shape": _cell(_where(late, source=src, schedule=sch))["rate"],
                      "colour": _cell(_where(late, source=src, schedule=sch), "colour_ok")["rate"],
                      "direction": None if src == "world twin" else _cell(_where(late, source=src, schedule=sch),
                                                                         "direction_ok")["rate"],
                      "on_seam": _mean([r["position"] != CLASSES[0] for r in _where(late, source=src, schedule=sch)])}
                     for src, sch in rows_src]
    t["by_shape"] = [{"schedule": sch, "shape": shape, **_cell(rs),
                      "read": {k or "none": sum(r["read"] == k for r in rs) / max(1, len(rs)) for k in (*SHAPES, None)}}
                     for sch in schedules for shape in SHAPES
                     for rs in [_where(late, source="model", schedule=sch, shape=shape)]]
    t["by_position"] = [{"source": src, "schedule": sch, "shape": shape,
                         "cells": {cls: _cell([r for r in rs if cls in ("all", r["position"])]) for cls in (*CLASSES, "all")}}
                        for src, sch in rows_src for shape in (*SHAPES, "all")
                        for rs in [[r for r in _where(late, source=src, schedule=sch) if shape in ("all", r["shape"])]]]
    t["by_relation"] = [{"source": src, "schedule": sch, "shape": shape,
                         "cells": {k: _cell([r for r in rs if k in ("all", r["relation"])]) for k in (*RELATIONS, "all")},
                         "recall_wrapped": {k: _mean([r["recall_wrapped"] for r in rs if r["relation"] == k]) for k in RELATIONS}}
                        for src, sch in [("model", s) for s in schedules] for shape in (*SHAPES, "all")
                        for rs in [[r for r in _where(late, source=src, schedule=sch) if shape in ("all", r["shape"])]]]
    t["placement"] = []
    for sch in schedules:
        st = [s for s in streams if s["case"] == "all prompts" and s["schedule"] == sch]
        n = max(1, len(st))
        teach = [s["teacher_start"] for s in st if s["teacher_start"] is not None]
        t["placement"].append({
            "schedule": sch, "streams": len(st),
            "cross_axis": [sum(s["cross_axis"] == k for s in st) for k in range(8)],
            "riding_a_seam": sum(s["cross_axis"] in (0, 7) for s in st) / n,
            "start_row_0_or_7": sum(s["start"][0] in (0, 7) for s in st) / n,
            "start_col_0_or_7": sum(s["start"][1] in (0, 7) for s in st) / n,
            "start_top_rows": sum(s["start"][0] in (0, 1) for s in st) / n,
            "teacher_found": len(teach) / n,
            "teacher_at_0_0": sum(tp == [0, 0] for tp in teach) / max(1, len(teach)),
            "teacher_row_0": sum(tp[0] == 0 for tp in teach) / max(1, len(teach)),
            "teacher_on_seam": sum(seam_class(*tp) != CLASSES[0] for tp in teach) / max(1, len(teach))})
    t["coverage"] = [{"source": src, "schedule": sch, "position": cls, "n": len(rs),
                      "precision": _mean([r["precision"] for r in rs]), "recall_main": _mean([r["recall_main"] for r in rs]),
                      "recall_wrapped": _mean([r["recall_wrapped"] for r in rs]), "fit_iou": _mean([r["fit_iou"] for r in rs])}
                     for src, sch in [("model", s) for s in schedules] for cls in CLASSES
                     for rs in [_where(late, source=src, schedule=sch, position=cls)]]
    chunks = -(-frames // c)
    t["by_chunk"] = [{"schedule": sch, "chunk": k, **_cell(rs), "on_seam": _mean([r["position"] != CLASSES[0] for r in rs]),
                      "inside": _cell([r for r in rs if r["position"] == CLASSES[0]])["rate"],
                      "seam": _cell([r for r in rs if r["position"] != CLASSES[0]])["rate"]}
                     for sch in schedules for k in range(chunks)
                     for rs in [[r for r in main if r["source"] == "model" and r["schedule"] == sch and r["t"] // c == k]]]
    t["first_chunk"] = []
    for sch in schedules:
        for ok in (True, False):
            st = [s for s in streams if s["case"] == "all prompts" and s["schedule"] == sch and s["first_chunk_ok"] == ok]
            t["first_chunk"].append({"schedule": sch, "first_chunk_ok": ok, "streams": len(st),
                                     "later_shape": _mean([s["shape_after_warmup"] for s in st])})
    t["failures"] = [{"schedule": sch, "shape": shape, "wrong_frames": len(rs),
                      "causes": {k: sum(r["failure"] == k for r in rs) / max(1, len(rs)) for k in FAILURES},
                      "on_seam": _mean([r["position"] != CLASSES[0] for r in rs])}
                     for sch in schedules for shape in (*SHAPES, "all")
                     for rs in [[r for r in _where(late, source="model", schedule=sch) if not r["ok"]
                                 and shape in ("all", r["shape"])]]]
    t["failures"] += [{"schedule": sch, "shape": "all, chunk 0", "wrong_frames": len(rs),
                       "causes": {k: sum(r["failure"] == k for r in rs) / max(1, len(rs)) for k in FAILURES},
                       "on_seam": _mean([r["position"] != CLASSES[0] for r in rs])}
                      for sch in schedules
                      for rs in [[r for r in _where(main, source="model", schedule=sch) if r["t"] < c and not r["ok"]]]]
    tf = [r for r in records if r["case"] == "teacher-forced"]
    t["teacher_forced"] = [{"shape": shape, "cells": {cls: _cell([r for r in rs if cls in ("all", r["position"])])
                                                      for cls in (*CLASSES, "all")}}
                           for shape in (*SHAPES, "all")
                           for rs in [[r for r in tf if shape in ("all", r["shape"])]]] if tf else []
    t["teacher_forced_loss"] = [{"position": cls, "n": len(ls), "v_loss": _mean([x["v_loss"] for x in ls]),
                                 "x0_err_main": _mean([x["x0_err_main"] for x in ls]),
                                 "x0_err_wrapped": _mean([x["x0_err_wrapped"] for x in ls]),
                                 "wrapped_share": _mean([x["wrapped_share"] for x in ls]),
                                 "recall_main": _mean([r["recall_main"] for r in rs]),
                                 "recall_wrapped": _mean([r["recall_wrapped"] for r in rs]),
                                 "position_found": _mean([x["fit_is_truth"] for x in ls])}
                                for cls in (*CLASSES, "all")
                                for ls, rs in [([x for x in losses if cls in ("all", x["position"])],
                                                [r for r in tf if cls in ("all", r["position"])])]] if losses else []
    issue = [r for r in records if r["case"] == "issue"]
    t["issue_cases"] = [{"prompt": p, "schedule": sch, "seed": ISSUE_SEED, "frames": len(rs), "shape_all": _cell(rs)["rate"],
                         "shape": _cell([r for r in rs if r["t"] >= c])["rate"],
                         "on_seam": _mean([r["position"] != CLASSES[0] for r in rs]),
                         "seam_shape": _cell([r for r in rs if r["position"] != CLASSES[0]])["rate"],
                         "inside_shape": _cell([r for r in rs if r["position"] == CLASSES[0]])["rate"],
                         "read": {k or "none": sum(r["read"] == k for r in rs) for k in (*SHAPES, None)},
                         "world_shape": _cell(_where(issue, source="world", prompt=p))["rate"]}
                        for p in ISSUE_PROMPTS for sch in schedules
                        for rs in [_where(issue, source="model", schedule=sch, prompt=p)] if rs]
    return t


def _rc(cell: dict) -> str:
    return f"{_pct(cell['rate'])} ({cell['n']})" if cell["n"] else "–"


def render_markdown(doc: dict) -> str:
    s, t = doc["settings"], doc["tables"]
    lines = [f"# {doc['title']}", "",
             (f"Model: {s['model']}. {s['prompt_streams']} prompts × seeds {', '.join(map(str, s['seeds']))}"
              f"{' (the same seed for every prompt)' if s['same_seed'] else ' (prompt i: seed + i)'} × "
              f"{s['frames']} frames ({s['seconds']:g} s at {s['fps']:g} fps) per schedule ({', '.join(s['schedules'])}), "
              f"steps {', '.join(f'{x:g}' for x in s['steps'])}, {s['threads']} thread(s), {s['wall_s']:.0f} s. Checker: "
              f"`streamgen.world.checker`. Rates are shares of frames with the prompted shape; \"after warm-up\" skips "
              f"the first chunk ({s['chunk_frames']} frames), as `streamgen eval` does. Position classes: where the "
              f"world's prompted object best explains the frame (the object's 3×3-token box inside the frame, or across "
              f"the top/bottom or left/right wrap seam, or both: corner). Cells: rate (frames)."), ""]
    lines += ["## Overview", ""]
    lines += _table(["source", "schedule", "frames", "shape, all frames", "shape after warm-up", "colour", "direction",
                     "frames on a seam"],
                    [[r["source"], r["schedule"], str(r["frames"]), _pct(r["shape_all"]), _pct(r["shape"]), _pct(r["colour"]),
                      _pct(r["direction"]), _pct(r["on_seam"])] for r in t["overview"]])
    lines += ["", "world: the world's own frames for the same prompt and seed (render.py); world twin: the world's "
              "object at every position found in the model's frames (its motion is the model's, so no direction). Both "
              "through the same checker.", ""]
    lines += ["## Per prompted shape (model, after warm-up), and what the checker read", ""]
    lines += _table(["schedule", "shape", "frames", "right", "read circle", "read square", "read triangle", "no shape"],
                    [[r["schedule"], r["shape"], str(r["n"]), _pct(r["rate"]),
                      *(_pct(r["read"][k]) for k in ("circle", "square", "triangle", "none"))] for r in t["by_shape"]])
    lines += ["", "## Per position (after warm-up)", ""]
    lines += _table(["source", "schedule", "shape", *CLASSES, "all"],
                    [[r["source"], r["schedule"], r["shape"], *(_rc(r["cells"][k]) for k in (*CLASSES, "all"))]
                     for r in t["by_position"] if r["source"] != "world twin" or r["shape"] == "all"])
    lines += ["", "## Per seam relative to the motion (model, after warm-up)", "",
              "crossing: the seam the motion carries the object through (2 frames in 8); riding: a seam parallel to the "
              "motion, straddled for as long as the object moves that way; corner: both. Last columns: recall of the "
              "wrapped part.", ""]
    lines += _table(["schedule", "shape", *RELATIONS, "all", "wrapped drawn: crossing", "riding", "corner"],
                    [[r["schedule"], r["shape"], *(_rc(r["cells"][k]) for k in (*RELATIONS, "all")),
                      *(_pct(r["recall_wrapped"][k]) for k in RELATIONS[1:])] for r in t["by_relation"]])
    lines += ["", "## Where the first chunk puts the object (model streams)", "",
              "The coordinate across the motion (the row of a left/right mover, the column of an up/down mover) is fixed "
              "by the first chunk; 0 and 7 ride a seam. World clips draw it uniformly: 25 % riding, 12.5 % per value. "
              "Phase-2 teacher: where `streamgen.train.data.detect_positions` (phase 2's R = 0 target) puts the object "
              "for the stream's own frame 0.", ""]
    lines += _table(["schedule", "streams", "across-motion coordinate 0…7 (streams)", "riding a seam", "frame 0 on row 0/7",
                     "frame 0 on column 0/7", "frame 0 on row 0/1", "teacher: found", "teacher: token (0, 0)",
                     "teacher: row 0", "teacher: on a seam"],
                    [[r["schedule"], str(r["streams"]), " ".join(map(str, r["cross_axis"])), _pct(r["riding_a_seam"]),
                      _pct(r["start_row_0_or_7"]), _pct(r["start_col_0_or_7"]), _pct(r["start_top_rows"]),
                      _pct(r["teacher_found"]), _pct(r["teacher_at_0_0"]), _pct(r["teacher_row_0"]), _pct(r["teacher_on_seam"])]
                     for r in t["placement"]])
    lines += ["", "## How much of the object is drawn (model, after warm-up)", "",
              "Against the world's prompted object at the found position: precision = drawn pixels inside it; recall "
              "of its main part (the frame half or quadrant that holds its anchor) and of its wrapped part (beyond "
              "the seam).", ""]
    lines += _table(["schedule", "position", "frames", "precision", "recall, main part", "recall, wrapped part", "IoU"],
                    [[r["schedule"], r["position"], str(r["n"]), _pct(r["precision"]), _pct(r["recall_main"]),
                      _pct(r["recall_wrapped"]), _num(r["fit_iou"], ".2f")] for r in t["coverage"]])
    lines += ["", "## Per chunk (model, every frame)", ""]
    chunks = sorted({r["chunk"] for r in t["by_chunk"]})
    for sch in s["schedules"]:
        rs = {r["chunk"]: r for r in t["by_chunk"] if r["schedule"] == sch}
        lines += [f"{sch}:", ""]
        lines += _table(["", *(f"chunk {k}" for k in chunks)],
                        [["shape", *(_pct(rs[k]["rate"]) for k in chunks)],
                         ["inside", *(_pct(rs[k]["inside"]) for k in chunks)],
                         ["on a seam", *(_pct(rs[k]["seam"]) for k in chunks)],
                         ["frames on a seam", *(_pct(rs[k]["on_seam"]) for k in chunks)]])
        lines += [""]
    lines += ["## Does the first chunk decide? (model)", ""]
    lines += _table(["schedule", "first chunk's shape (≥ 2 of 3 frames)", "streams", "shape after warm-up"],
                    [[r["schedule"], "right" if r["first_chunk_ok"] else "wrong", str(r["streams"]), _pct(r["later_shape"])]
                     for r in t["first_chunk"]])
    lines += ["", "## Why a frame's shape is wrong (model, after warm-up; last rows: the first chunk)", "",
              "nothing drawn: area < 40 px; too big: > 300 px; wrapped part missing: on a seam, ≥ 70 % of the main "
              "part drawn and < 50 % of the wrapped part; other shape: the checker decodes another template; blob: "
              "no template reaches IoU 0.6.", ""]
    lines += _table(["schedule", "shape", "wrong frames", *FAILURES, "on a seam"],
                    [[r["schedule"], r["shape"], str(r["wrong_frames"]), *(_pct(r["causes"][k]) for k in FAILURES),
                      _pct(r["on_seam"])] for r in t["failures"]])
    if t["teacher_forced"]:
        lines += ["", "## Teacher-forced: ground-truth context, the model draws one chunk", "",
                  (f"{s['teacher_forced_clips']} clips: two ground-truth chunks as clean context, the third generated "
                   "with the stream's sampler (4 steps, exact); target positions "
                   f"{'all 64' if s['teacher_forced_per_shape'] >= 64 else s['teacher_forced_per_shape']} per shape, "
                   "classed by the true position."), ""]
        lines += _table(["shape", *CLASSES, "all"],
                        [[r["shape"], *(_rc(r["cells"][k]) for k in (*CLASSES, "all"))] for r in t["teacher_forced"]])
        lines += ["", "Training loss on the same clips (flow-matching v-MSE, mean over the sampler's 4 levels) and the "
                  "x̂0 squared error per pixel on the object's main and wrapped parts; recall of the generated chunk:", ""]
        lines += _table(["position", "frames", "v-loss", "x̂0 error, main part", "x̂0 error, wrapped part",
                         "wrapped part's share of the frame's x̂0 error", "recall, main", "recall, wrapped", "drawn where the world puts it"],
                        [[r["position"], str(r["n"]), _num(r["v_loss"]), _num(r["x0_err_main"]), _num(r["x0_err_wrapped"]),
                          _pct(r["wrapped_share"]),
                          _pct(r["recall_main"]), _pct(r["recall_wrapped"]), _pct(r["position_found"])]
                         for r in t["teacher_forced_loss"]])
    if t["issue_cases"]:
        lines += ["", f"## The issue's renders (seed {ISSUE_SEED}, {s['seconds']:g} s)", ""]
        lines += _table(["prompt", "schedule", "shape, all frames", "after warm-up", "frames on a seam", "on a seam",
                         "inside", "read (circle/square/triangle/none)", "world, same prompt and seed"],
                        [[r["prompt"], r["schedule"], _pct(r["shape_all"]), _pct(r["shape"]), _pct(r["on_seam"]),
                          _pct(r["seam_shape"]), _pct(r["inside_shape"]),
                          "/".join(str(r["read"][k]) for k in ("circle", "square", "triangle", "none")),
                          _pct(r["world_shape"])] for r in t["issue_cases"]])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Running it

def diagnose(bundle, name: str, *, prompts: int | str | Sequence[str] = "all", seeds: Sequence[int] = (ISSUE_SEED,), seconds: float = 3.0,
             schedules: Sequence[str] = ("exact", "timestep-slot"), teacher_forced_per_shape: int = 64,
             issue_cases: bool = True, same_seed: bool = False, threads: int = 1, progress: bool = True) -> dict:
    """Everything the command does short of writing files: returns the report document."""
    import torch
    from tqdm import tqdm

    from ..world import FPS
    from .sources import ModelSource

    torch.set_num_threads(threads)
    source = ModelSource(bundle, name)
    c = source.chunk_frames
    frames = max(c, round(seconds * FPS))
    items = list(prompts) if isinstance(prompts, (list, tuple)) else prompt_items(prompts, 0)
    clips = teacher_forced_clips(teacher_forced_per_shape, 0) if teacher_forced_per_shape else []
    cases = list(ISSUE_PROMPTS) if issue_cases else []
    total = (len(items) * len(seeds) + len(cases)) * len(schedules) * frames + len(clips) * c
    start = time.perf_counter()
    bar = tqdm(total=total, unit="frame", desc="shape diagnosis", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        bar.set_postfix_str("streams", refresh=False)
        records, streams = stream_records(source, items, seeds, frames, schedules, bar.update, offset=not same_seed)
        if cases:
            bar.set_postfix_str("issue cases", refresh=False)
            more, more_streams = stream_records(source, cases, [ISSUE_SEED], frames, schedules, bar.update, case="issue",
                                                offset=False)
            records += more
            streams += more_streams
        losses: list[dict] = []
        if clips:
            bar.set_postfix_str("teacher-forced", refresh=False)
            tf, losses = teacher_forced(bundle, clips, 0, tick=bar.update)
            records += tf
    finally:
        bar.close()
    settings = {"model": name, "prompts": prompts, "prompt_streams": len(items), "seeds": list(seeds), "same_seed": same_seed,
                "seconds": seconds,
                "fps": float(FPS), "frames": frames, "chunk_frames": c, "schedules": list(schedules),
                "steps": list(bundle.stream.steps), "teacher_forced_per_shape": teacher_forced_per_shape,
                "teacher_forced_clips": len(clips), "threads": threads, "wall_s": round(time.perf_counter() - start, 1)}
    return {"title": TITLE, "settings": settings,
            "tables": build_tables(records, streams, losses, schedules, c, frames), "streams": streams}


def write_outputs(doc: dict, out: Path) -> tuple[Path, Path, str]:
    return write_report(doc, render_markdown(doc), out, "shape_diagnosis")


def main(argv: list[str] | None = None) -> int:
    from ..names import SCHEDULES
    from .cli import _count, _prompts_arg

    p = argparse.ArgumentParser(prog="python -m streamgen.evaluation.shape_diagnosis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, metavar="FILE", help="embedded-model weights (default: the shipped ones)")
    p.add_argument("--seeds", type=int, nargs="+", default=[ISSUE_SEED],
                   help="stream noise seeds (default 7, the issue's); prompt i runs with seed + i, as streamgen eval does")
    p.add_argument("--same-seed", action="store_true",
                   help="run every prompt with the seed itself (all prompts share one noise draw, like one-off renders)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per stream at the model's 8 fps (default 3)")
    p.add_argument("--prompts", type=_prompts_arg, default="all", help="'all' 84 prompts (default) or N of them")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    p.add_argument("--teacher-forced", type=_count(0), default=64, metavar="N",
                   help="teacher-forced clips per shape, target positions out of the 64 (default 64: all; 0: none)")
    p.add_argument("--no-issue-cases", action="store_true", help="skip the issue's two prompts at seed 7")
    p.add_argument("--threads", type=_count(1), default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="writes DIR/shape_diagnosis.json and DIR/shape_diagnosis.md")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no Markdown on stdout")
    args = p.parse_args(argv)
    if not args.seconds > 0:
        p.error("--seconds must be > 0")
    from ..bundles.embedded import WEIGHTS_PATH, embedded_bundle

    path = args.weights or WEIGHTS_PATH
    if not Path(path).is_file():
        print(f"shape_diagnosis: error: weights file not found: {path}", file=sys.stderr)
        return 2
    doc = diagnose(embedded_bundle(path), f"embedded ({path})", prompts=args.prompts, seeds=args.seeds,
                   seconds=args.seconds, schedules=args.schedules, teacher_forced_per_shape=args.teacher_forced,
                   issue_cases=not args.no_issue_cases, same_seed=args.same_seed, threads=args.threads, progress=not args.quiet)
    json_path, md_path, md = write_outputs(doc, args.out)
    if not args.quiet:
        print(md)
    print(f"wrote {json_path} and {md_path} ({doc['settings']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CLASSES", "FAILURES", "RELATIONS", "seam_relation", "ISSUE_PROMPTS", "build_tables", "diagnose", "fit_positions", "frame_records",
           "main", "object_parts", "render_markdown", "seam_class", "stream_records", "teacher_forced",
           "teacher_forced_clips", "with_seams_cut", "world_twin", "write_outputs"]
