"""The avatar world's non-learned checker (contract: docs/avatar_world.md): reads mouth opening, eye state
and identity off frames, and scores a clip against the audio that drove it.

- Mouth opening per frame: the dark share of the mouth box (MOUTH_COLS × rows MOUTH_TOP … +MAX_OPENING)
  in px rows, minus the closed line: 0 for a closed mouth, k for opening k, fractional for blurry frames.
- Eyes: open when the top eye row is mostly dark.
- Identity: the face colour (median of the bright pixels) and the head outline with the best IoU,
  ignoring the eye and mouth boxes.
- Lip sync: Pearson correlation between the opening and the ground-truth opening of the audio, and the
  lag (in frames, positive = the mouth is late) that maximises their cross-correlation within ±MAX_LAG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .drive import mouth_openings
from .face import EYE_COLS, EYE_ROWS, HEAD_SHAPES, MAX_OPENING, MOUTH_COLS, MOUTH_TOP, Identity, head_masks

DARK = 0.25  # a pixel is dark (a cut-out, or background) when its largest channel is below this
MAX_LAG = 6
COLOUR_TOLERANCE = 0.15  # largest channel difference for a colour match


@dataclass(frozen=True)
class FrameReading:
    """What the checker reads off one frame."""

    opening: float
    eyes_open: bool
    colour: tuple[float, float, float]
    shape: str
    shape_iou: float


def _as_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] or float [N, 3, H, W] in [0, 1] → float32 [N, H, W, 3] in [0, 1]."""
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)
    return x.astype(np.float32)


def _feature_boxes() -> np.ndarray:
    m = np.zeros(head_masks()["round"].shape, bool)
    for c0, c1 in EYE_COLS:
        m[EYE_ROWS[0]:EYE_ROWS[1], c0:c1] = True
    m[MOUTH_TOP:MOUTH_TOP + MAX_OPENING + 1, MOUTH_COLS[0]:MOUTH_COLS[1]] = True
    return m


def read_frames(frames: np.ndarray) -> list[FrameReading]:
    """Read every frame (uint8 [N, 32, 32, 3] or float [N, 3, 32, 32])."""
    x = _as_unit(frames)
    level = x.max(axis=3)
    dark = level < DARK
    outside = ~_feature_boxes()
    readings = []
    for i in range(len(x)):
        mouth = dark[i, MOUTH_TOP:MOUTH_TOP + MAX_OPENING + 1, MOUTH_COLS[0]:MOUTH_COLS[1]]
        opening = max(0.0, float(mouth.mean()) * (MAX_OPENING + 1) - 1.0)
        eyes = np.concatenate([dark[i, EYE_ROWS[0], c0:c1] for c0, c1 in EYE_COLS])
        bright = ~dark[i]
        colour = tuple(float(v) for v in (np.median(x[i][bright], axis=0) if bright.any() else np.zeros(3)))
        ious = {s: float(((m & bright) & outside).sum() / max(1, ((m | bright) & outside).sum()))
                for s, m in head_masks().items()}
        shape = max(HEAD_SHAPES, key=lambda s: ious[s])
        readings.append(FrameReading(opening, bool(eyes.mean() > 0.5), colour, shape, ious[shape]))
    return readings


def lag_and_correlation(opening: np.ndarray, target: np.ndarray, max_lag: int = MAX_LAG) -> tuple[int, float, float]:
    """(lag, correlation at that lag, correlation at lag 0): lag > 0 when `opening` trails `target`."""
    a, b = np.asarray(opening, np.float64), np.asarray(target, np.float64)

    def corr(lag: int) -> float:
        x, y = (a[lag:], b[:len(b) - lag]) if lag >= 0 else (a[:lag], b[-lag:])
        if len(x) < 3 or x.std() < 1e-9 or y.std() < 1e-9:
            return 0.0
        return float(np.corrcoef(x, y)[0, 1])

    scores = {lag: corr(lag) for lag in range(-max_lag, max_lag + 1)}
    best = max(scores, key=lambda k: (scores[k], -abs(k)))
    return best, scores[best], scores[0]


def jitter(frames: np.ndarray, skip: int = 0) -> float:
    """Idle stillness: the mean absolute frame-to-frame change of the pixels outside the eye and mouth boxes
    (0 for the world, whose face never moves; flicker and drift raise it)."""
    x = _as_unit(frames)[skip:]
    if len(x) < 2:
        return 0.0
    outside = ~_feature_boxes()
    return float(np.abs(np.diff(x, axis=0))[:, outside].mean())


def score_clip(frames: np.ndarray, samples: np.ndarray, identity: Identity, blinks: np.ndarray | None = None,
               skip: int = 0) -> dict[str, Any]:
    """Score generated frames against the audio that drove them (frame n ↔ samples of frame n) and the
    reference identity; the first `skip` frames are left out (a stream's warm-up)."""
    readings = read_frames(frames)[skip:]
    target = mouth_openings(samples, skip + len(readings))[skip:]
    opening = np.array([r.opening for r in readings])
    lag, best_corr, corr0 = lag_and_correlation(opening, target)
    speech, silence = target > 0, target == 0
    colour_err = np.array([np.abs(np.asarray(r.colour) - np.asarray(identity.colour)).max() for r in readings])
    result = {
        "frames": len(readings),
        "lipsync_corr": corr0,
        "lag_frames": lag,
        "lag_corr": best_corr,
        "opening_mae": float(np.abs(opening - target).mean()) if len(target) else 0.0,
        "mouth_speech": float(opening[speech].mean()) if speech.any() else 0.0,
        "mouth_silence": float(opening[silence].mean()) if silence.any() else 0.0,
        "colour_match": float((colour_err <= COLOUR_TOLERANCE).mean()) if len(readings) else 0.0,
        "shape_match": float(np.mean([r.shape == identity.shape for r in readings])) if readings else 0.0,
        "shape_iou": float(np.mean([r.shape_iou for r in readings])) if readings else 0.0,
    }
    result["identity"] = min(result["colour_match"], result["shape_match"])
    result["jitter"] = jitter(frames, skip)
    if blinks is not None:
        closed = np.asarray(blinks, bool)[skip:skip + len(readings)]
        eyes_closed = np.array([not r.eyes_open for r in readings])
        result["eyes_match"] = float((eyes_closed == closed).mean()) if len(readings) else 0.0
    return result
