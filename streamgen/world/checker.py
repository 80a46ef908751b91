"""The non-learned checker: decodes colour, shape, position and motion from frames and scores them
against the prompt in force (contract and thresholds: docs/world.md, "Checker").

    analysis = analyze(frames)                       # per-frame decoding, no prompt needed
    scores = score(analysis, prompts)                # per-frame ok flags against the prompt timeline
    metrics = clip_metrics(frames, prompts)          # adherence, switch latency, quality, drift (a JSON-able dict)
    segments = segment_metrics(frames, prompts, 40)  # the same per segment, for long rollouts

Frames: [T, 3, H, W] or [3, H, W], numpy or torch, float in [0, 1] (clipped) or uint8 (÷255).
Prompts: one Prompt or text for every frame, a per-frame list of Prompt / text / 3 token ids, or token ids [T, 3].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from statistics import median
from typing import Any, Optional, Sequence

import numpy as np

from .render import TOKEN_SIZE, shape_template
from .vocab import ATTRIBUTES, COLOURS, PALETTE_ARRAY, SHAPES, Prompt, parse_prompt, prompt_from_tokens

FG_THRESHOLD = 0.5            # foreground: brightest channel > this
AREA_RANGE = (40, 300)        # plausible object area in px (objects are 84…144 px); outside → no colour, no motion
COLOUR_MAX_DIST = 0.5         # mean foreground colour must be nearer than this (RGB, Euclidean) to its palette colour
SHAPE_MIN_IOU = 0.6           # best template IoU below this → no shape
MAX_SHIFT_PX = 6              # motion search: integer torus shifts with |dy|, |dx| ≤ this
MOTION_MIN_IOU = 0.3          # best shifted IoU between consecutive frames below this → no motion decoded
MID_RANGE = (0.15, 0.85)      # "mid" pixel: any channel strictly inside this range
WARMUP_FRAMES = 3             # frames excluded from adherence (the first chunk)
CHUNK_FRAMES = 3              # frames per chunk, for latencies in chunks
HOLD_FRAMES = 3               # a switched attribute "holds" when right on this many consecutive frames
DRIFT_FRAMES = 24             # default window for drift (first N after warm-up vs last N)

STILL = "still"
_BLOCK = 256  # frames per block in the template matching
LATENCY_ATTRIBUTES = (*ATTRIBUTES, "prompt")


# ----------------------------------------------------------------------------------------------
# Inputs

def as_frames(frames: Any) -> np.ndarray:
    """→ float32 numpy [T, 3, H, W] in [0, 1]."""
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().cpu()
        if str(frames.dtype) == "torch.uint8":
            frames = frames.numpy()
        else:
            frames = frames.float().numpy()
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W] or [3, H, W], got shape {tuple(x.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32, copy=False), 0.0, 1.0)


def as_prompts(prompts: Any, frames: int) -> list[Prompt]:
    """A per-frame prompt timeline of length `frames`."""
    if isinstance(prompts, (Prompt, str)):
        prompts = [prompts] * frames
    elif hasattr(prompts, "shape") and len(getattr(prompts, "shape")) == 2:  # token ids [T, 3]
        prompts = [prompt_from_tokens(row) for row in np.asarray(prompts).tolist()]
    elif hasattr(prompts, "shape") and tuple(getattr(prompts, "shape")) == (3,):
        prompts = [prompt_from_tokens(np.asarray(prompts).tolist())] * frames
    out = [p if isinstance(p, Prompt) else parse_prompt(p).prompt if isinstance(p, str) else prompt_from_tokens(p)
           for p in prompts]
    if len(out) != frames:
        raise ValueError(f"{len(out)} prompts for {frames} frames")
    return out


# ----------------------------------------------------------------------------------------------
# Per-frame decoding

@dataclass
class FrameAnalysis:
    """Per-frame decoding (arrays of length T; names are None where nothing could be decoded).

    area: foreground px. mean_colour [T, 3]. colour: palette name. colour_dist: distance to it.
    shape: name. shape_ious [T, 3]: best IoU per template over all torus offsets. anchor [T, 2]:
    the best template's anchor in token units (row, col; a GT frame at (r, c) gives exactly (r, c)).
    centroid [T, 2]: circular-mean foreground centroid in px (row, col). shift [T, 2]: integer torus
    shift (dy, dx) px from frame t-1 to t (frame 0: 0, 0). shift_iou. direction: left/right/up/down/
    "still"/None (frame 0 always None). sharpness: mean torus gradient magnitude. mid_fraction.
    """

    area: np.ndarray
    mean_colour: np.ndarray
    colour: list[Optional[str]]
    colour_dist: np.ndarray
    shape: list[Optional[str]]
    shape_ious: np.ndarray
    anchor: np.ndarray
    centroid: np.ndarray
    shift: np.ndarray
    shift_iou: np.ndarray
    direction: list[Optional[str]]
    sharpness: np.ndarray
    mid_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.area)


@lru_cache(maxsize=8)
def _template_ffts(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.stack([shape_template(s, height, width) for s in range(len(SHAPES))]).astype(np.float64)
    return np.conj(np.fft.rfft2(t)), t.sum((1, 2))


@lru_cache(maxsize=8)
def _shift_table(max_shift: int) -> np.ndarray:
    """Candidate shifts (dy, dx), smallest L1 norm first (so ties resolve towards "still")."""
    r = range(-max_shift, max_shift + 1)
    shifts = sorted(((dy, dx) for dy in r for dx in r), key=lambda s: (abs(s[0]) + abs(s[1]), abs(s[0]), s))
    return np.array(shifts, dtype=np.int64)


def _circular_centroid(fg: np.ndarray) -> np.ndarray:
    T, H, W = fg.shape
    out = np.full((T, 2), np.nan)
    for axis, n, k in ((2, H, 0), (1, W, 1)):
        profile = fg.sum(axis=axis).astype(np.float64)  # [T, n]
        ang = 2 * np.pi * np.arange(n) / n
        c, s = profile @ np.cos(ang), profile @ np.sin(ang)
        ok = profile.sum(1) > 0
        out[ok, k] = (np.arctan2(s[ok], c[ok]) % (2 * np.pi)) * n / (2 * np.pi)
    return out


def _direction_name(dy: int, dx: int) -> Optional[str]:
    if dy == 0 and dx == 0:
        return STILL
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    if abs(dy) > abs(dx):
        return "down" if dy > 0 else "up"
    return None  # diagonal: no dominant axis


def analyze(frames: Any) -> FrameAnalysis:
    """Decode every frame (see FrameAnalysis)."""
    x = as_frames(frames)
    T, _, H, W = x.shape
    fg = x.max(axis=1) > FG_THRESHOLD                                    # [T, H, W]
    area = fg.sum((1, 2))
    plausible = (area >= AREA_RANGE[0]) & (area <= AREA_RANGE[1])

    mean_colour = np.einsum("tchw,thw->tc", x, fg.astype(np.float32)) / np.maximum(area, 1)[:, None]
    dist = np.linalg.norm(mean_colour[:, None, :] - PALETTE_ARRAY[None], axis=-1)  # [T, 7]
    nearest = dist.argmin(1)
    colour_dist = dist[np.arange(T), nearest]
    colour = [COLOURS[n] if ok and d < COLOUR_MAX_DIST else None
              for n, ok, d in zip(nearest.tolist(), plausible.tolist(), colour_dist.tolist())]

    # Shape: IoU against each template at every torus offset (intersections by FFT cross-correlation).
    F = np.fft.rfft2(fg.astype(np.float64))                               # [T, H, W//2+1]
    tconj, tarea = _template_ffts(H, W)
    best_off = np.zeros((T, len(SHAPES)), dtype=np.int64)
    shape_ious = np.zeros((T, len(SHAPES)))
    for lo in range(0, T, _BLOCK):                                        # blocks bound the [t, 3, H, W] temporaries
        hi = min(T, lo + _BLOCK)
        inter = np.rint(np.fft.irfft2(F[lo:hi, None] * tconj[None], s=(H, W)))  # [o] = Σ fg[p] tmpl[p - o]
        union = area[lo:hi, None, None, None] + tarea[None, :, None, None] - inter
        flat = np.where(union > 0, inter / np.maximum(union, 1), 0.0).reshape(hi - lo, len(SHAPES), H * W)
        best_off[lo:hi] = flat.argmax(-1)
        shape_ious[lo:hi] = np.take_along_axis(flat, best_off[lo:hi, :, None], -1)[..., 0]
    best_shape = shape_ious.argmax(1)
    shape = [SHAPES[s] if v >= SHAPE_MIN_IOU else None
             for s, v in zip(best_shape.tolist(), shape_ious[np.arange(T), best_shape].tolist())]
    off = best_off[np.arange(T), best_shape]
    anchor = np.stack([off // W, off % W], 1).astype(np.float64) / TOKEN_SIZE
    anchor[[s is None for s in shape]] = np.nan

    # Motion: shift of frame t-1 that best overlaps frame t.
    shift = np.zeros((T, 2), dtype=np.int64)
    shift_iou = np.zeros(T)
    direction: list[Optional[str]] = [None] * T
    if T > 1:
        cross = np.rint(np.fft.irfft2(F[1:] * np.conj(F[:-1]), s=(H, W)))  # [T-1, H, W]; [d] = Σ fg_t[p] fg_{t-1}[p - d]
        table = _shift_table(min(MAX_SHIFT_PX, (min(H, W) - 1) // 2))
        inter_s = cross[:, table[:, 0] % H, table[:, 1] % W]                 # [T-1, S]
        union_s = (area[1:, None] + area[:-1, None]) - inter_s
        iou_s = np.where(union_s > 0, inter_s / np.maximum(union_s, 1), 0.0)
        k = iou_s.argmax(1)
        shift[1:] = table[k]
        shift_iou[1:] = iou_s[np.arange(T - 1), k]
        for t in range(1, T):
            if plausible[t] and plausible[t - 1] and shift_iou[t] >= MOTION_MIN_IOU:
                direction[t] = _direction_name(int(shift[t, 0]), int(shift[t, 1]))

    gx = np.roll(x, -1, axis=3) - x
    gy = np.roll(x, -1, axis=2) - x
    sharpness = np.sqrt(gx**2 + gy**2).mean((1, 2, 3))
    mid_fraction = ((x > MID_RANGE[0]) & (x < MID_RANGE[1])).any(axis=1).mean((1, 2))

    return FrameAnalysis(area=area, mean_colour=mean_colour, colour=colour, colour_dist=colour_dist, shape=shape,
                         shape_ious=shape_ious, anchor=anchor, centroid=_circular_centroid(fg), shift=shift,
                         shift_iou=shift_iou, direction=direction, sharpness=sharpness, mid_fraction=mid_fraction)


def classify_shape(mask: np.ndarray) -> Optional[str]:
    """Shape of one foreground mask [H, W] (bool), or None."""
    m = np.asarray(mask, dtype=np.float32)[None, None].repeat(3, 1)
    return analyze(m).shape[0]


# ----------------------------------------------------------------------------------------------
# Scoring against the prompt timeline

@dataclass
class FrameScores:
    """Per-frame booleans against the prompt in force. direction_ok[0] is False and not counted
    (direction_valid[0] is False): frame 0 has no motion."""

    prompts: list[Prompt]
    colour_ok: np.ndarray
    shape_ok: np.ndarray
    direction_ok: np.ndarray
    direction_valid: np.ndarray

    @property
    def adherent(self) -> np.ndarray:
        return self.colour_ok & self.shape_ok & self.direction_ok

    @property
    def colour_direction_ok(self) -> np.ndarray:
        return self.colour_ok & self.direction_ok

    def ok(self, attribute: str) -> np.ndarray:
        return {"colour": self.colour_ok, "shape": self.shape_ok, "direction": self.direction_ok,
                "prompt": self.adherent}[attribute]


def score(analysis: FrameAnalysis | Any, prompts: Any) -> FrameScores:
    a = analysis if isinstance(analysis, FrameAnalysis) else analyze(analysis)
    T = len(a)
    ps = as_prompts(prompts, T)
    colour_ok = np.array([a.colour[t] == ps[t].colour for t in range(T)], dtype=bool)
    shape_ok = np.array([a.shape[t] == ps[t].shape for t in range(T)], dtype=bool)
    direction_ok = np.array([t > 0 and a.direction[t] == ps[t].direction for t in range(T)], dtype=bool)
    valid = np.arange(T) > 0
    return FrameScores(ps, colour_ok, shape_ok, direction_ok, valid)


# ----------------------------------------------------------------------------------------------
# Clip / stream metrics

def _rate(ok: np.ndarray, idx: np.ndarray) -> Optional[float]:
    return float(ok[idx].mean()) if len(idx) else None


def _mean(v: np.ndarray, idx: np.ndarray) -> Optional[float]:
    return float(v[idx].mean()) if len(idx) else None


def _window_metrics(a: FrameAnalysis, s: FrameScores, idx: np.ndarray) -> dict[str, Optional[float]]:
    """Adherence rates and quality over frames `idx` (direction only over frames ≥ 1)."""
    didx = idx[idx >= 1]
    still = np.array([d == STILL for d in a.direction])
    return {
        "colour": _rate(s.colour_ok, idx),
        "shape": _rate(s.shape_ok, idx),
        "direction": _rate(s.direction_ok, didx),
        "colour_direction": _rate(s.colour_direction_ok, didx),
        "all": _rate(s.adherent, didx),
        "still": _rate(still, didx),
        "sharpness": _mean(a.sharpness, idx),
        "mid_fraction": _mean(a.mid_fraction, idx),
        "area": _mean(a.area.astype(np.float64), idx),
    }


def switch_frames(prompts: Sequence[Prompt]) -> list[int]:
    """Frames t ≥ 1 whose prompt differs from frame t-1's."""
    return [t for t in range(1, len(prompts)) if prompts[t] != prompts[t - 1]]


def switch_events(scores: FrameScores, *, chunk_frames: int = CHUNK_FRAMES, hold_frames: int = HOLD_FRAMES) -> list[dict]:
    """One event per switch and changed attribute, plus one "prompt" event per switch (all three).

    latency_frames: the smallest k ≥ 0 such that frames s+k … s+k+hold-1 all show the new value
    (for "prompt": all three attributes right), within the frames before the next switch / the end;
    None = never. latency_chunks: chunk boundaries crossed, (s+k)//chunk − s//chunk. An event whose
    window is shorter than `hold_frames` cannot be measured: measurable False, latency None, and it is
    left out of the summaries (neither a latency nor a "never").
    """
    ps = scores.prompts
    T = len(ps)
    starts = switch_frames(ps)
    events = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else T
        old, new = ps[s - 1], ps[s]
        attrs = [a for a in ATTRIBUTES if getattr(old, a) != getattr(new, a)] + ["prompt"]
        for attr in attrs:
            ok = scores.ok(attr)
            k_found = None
            for k in range(0, end - s - hold_frames + 1):
                if ok[s + k:s + k + hold_frames].all():
                    k_found = k
                    break
            events.append({
                "frame": s, "attribute": attr,
                "from": old.text() if attr == "prompt" else getattr(old, attr),
                "to": new.text() if attr == "prompt" else getattr(new, attr),
                "window_frames": end - s,
                "measurable": end - s >= hold_frames,
                "latency_frames": k_found,
                "latency_chunks": None if k_found is None else (s + k_found) // chunk_frames - s // chunk_frames,
            })
    return events


def summarize_latency(events: Sequence[dict]) -> dict[str, dict]:
    """Per attribute (colour, shape, direction, prompt) over measurable events: switches, never,
    median/mean/max in frames, median/max in chunks (None when no event got a latency)."""
    out = {}
    for attr in LATENCY_ATTRIBUTES:
        ev = [e for e in events if e["attribute"] == attr and e.get("measurable", True)]
        got = [e["latency_frames"] for e in ev if e["latency_frames"] is not None]
        chunks = [e["latency_chunks"] for e in ev if e["latency_chunks"] is not None]
        out[attr] = {
            "switches": len(ev),
            "never": len(ev) - len(got),
            "median_frames": float(median(got)) if got else None,
            "mean_frames": float(np.mean(got)) if got else None,
            "max_frames": int(max(got)) if got else None,
            "median_chunks": float(median(chunks)) if chunks else None,
            "max_chunks": int(max(chunks)) if chunks else None,
        }
    return out


def clip_metrics(frames: Any, prompts: Any, *, warmup: int = WARMUP_FRAMES, chunk_frames: int = CHUNK_FRAMES,
                 hold_frames: int = HOLD_FRAMES, drift_frames: Optional[int] = None,
                 analysis: Optional[FrameAnalysis] = None) -> dict:
    """All clip/stream metrics as a JSON-able dict (schema: docs/world.md, "Metrics")."""
    a = analysis if analysis is not None else analyze(frames)
    s = score(a, prompts)
    T = len(a)
    w = max(0, min(warmup, T))
    idx = np.arange(w, T)
    window = _window_metrics(a, s, idx)
    rates = {k: window[k] for k in ("colour", "shape", "direction", "colour_direction", "all", "still")}
    quality = {k: window[k] for k in ("sharpness", "mid_fraction", "area")}

    events = switch_events(s, chunk_frames=chunk_frames, hold_frames=hold_frames)

    drift = None
    n_eval = T - w
    if n_eval >= 2:
        n = drift_frames if drift_frames is not None else min(DRIFT_FRAMES, n_eval // 2)
        n = max(1, min(n, n_eval))
        first = _window_metrics(a, s, np.arange(w, w + n))
        last = _window_metrics(a, s, np.arange(T - n, T))
        drift = {"frames": n, "first": first, "last": last,
                 "delta": {k: (None if first[k] is None or last[k] is None else last[k] - first[k]) for k in first}}
    return {
        "frames": T, "warmup": w, "evaluated_frames": n_eval, "chunk_frames": chunk_frames, "hold_frames": hold_frames,
        "rates": rates, "quality": quality,
        "switch_events": events, "switch_latency": summarize_latency(events),
        "drift": drift,
    }


def segment_metrics(frames: Any, prompts: Any, segment_frames: int = 40, *, warmup: int = WARMUP_FRAMES,
                    analysis: Optional[FrameAnalysis] = None) -> list[dict]:
    """Rates and quality per consecutive segment of `segment_frames` (warm-up frames excluded), for long rollouts."""
    a = analysis if analysis is not None else analyze(frames)
    s = score(a, prompts)
    T = len(a)
    out = []
    for start in range(0, T, segment_frames):
        end = min(T, start + segment_frames)
        idx = np.arange(max(start, warmup), end)
        out.append({"start": start, "end": end, **_window_metrics(a, s, idx)})
    return out


__all__ = [
    "AREA_RANGE", "CHUNK_FRAMES", "COLOUR_MAX_DIST", "DRIFT_FRAMES", "FG_THRESHOLD", "HOLD_FRAMES", "MAX_SHIFT_PX",
    "MID_RANGE", "MOTION_MIN_IOU", "SHAPE_MIN_IOU", "STILL", "WARMUP_FRAMES",
    "FrameAnalysis", "FrameScores", "analyze", "as_frames", "as_prompts", "classify_shape", "clip_metrics",
    "score", "segment_metrics", "summarize_latency", "switch_events", "switch_frames",
]
