"""The talking face of the avatar world (contract: docs/avatar_world.md): geometry, identity, rendering.

A frame is 32×32 RGB on black: one head of a single colour and one of three outlines, two eyes and a
mouth cut out of it in black. Identity = (colour, head shape); the mouth's opening and whether the eyes
are open change per frame, nothing else does. Rendering is exact (no anti-aliasing), so the checker
decodes a rendered frame with no error.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FRAME_SIZE = 32
HEAD_SHAPES = ("round", "square", "oval")
MAX_OPENING = 5  # mouth opening in px rows below the closed line: 0 (closed) … MAX_OPENING
MIN_BRIGHTNESS = 0.5  # a face colour's largest channel; darker colours are brightened to it
EYE_ROWS = (10, 12)  # [start, end): open eyes fill both rows, closed eyes only the last
EYE_COLS = ((10, 14), (18, 22))
MOUTH_TOP = 20  # the closed mouth is this one row; opening k adds rows MOUTH_TOP+1 … MOUTH_TOP+k
MOUTH_COLS = (12, 20)


@dataclass(frozen=True)
class Identity:
    """Who the avatar is: an RGB colour in [0, 1] (largest channel ≥ MIN_BRIGHTNESS) and a head shape."""

    colour: tuple[float, float, float]
    shape: str

    def __post_init__(self) -> None:
        if self.shape not in HEAD_SHAPES:
            raise ValueError(f"unknown head shape {self.shape!r}; known: {', '.join(HEAD_SHAPES)}")
        c = tuple(float(v) for v in self.colour)
        if len(c) != 3 or not all(0.0 <= v <= 1.0 for v in c) or max(c) < MIN_BRIGHTNESS - 1e-6:
            raise ValueError(f"colour must be RGB in [0, 1] with a channel ≥ {MIN_BRIGHTNESS}, got {self.colour}")
        object.__setattr__(self, "colour", c)


@lru_cache(maxsize=None)
def head_masks() -> dict[str, np.ndarray]:
    """The three head outlines [32, 32] bool; pixel (i, j) has its centre at (i + 0.5 − 16, j + 0.5 − 16)."""
    c = np.arange(FRAME_SIZE) + 0.5 - FRAME_SIZE / 2
    dy, dx = np.meshgrid(c, c, indexing="ij")
    return {
        "round": dy**2 + dx**2 <= 12.5**2,
        "square": (np.abs(dy) <= 11) & (np.abs(dx) <= 11),
        "oval": (dx / 8.5) ** 2 + (dy / 13.5) ** 2 <= 1.0,
    }


@lru_cache(maxsize=None)
def feature_masks() -> dict[str, np.ndarray]:
    """Black cut-outs [32, 32] bool: `eyes_open`, `eyes_closed`, and `mouth_k` for every opening k."""
    out = {}
    for name, rows in (("eyes_open", range(*EYE_ROWS)), ("eyes_closed", [EYE_ROWS[1] - 1])):
        m = np.zeros((FRAME_SIZE, FRAME_SIZE), bool)
        for c0, c1 in EYE_COLS:
            m[list(rows), c0:c1] = True
        out[name] = m
    for k in range(MAX_OPENING + 1):
        m = np.zeros((FRAME_SIZE, FRAME_SIZE), bool)
        m[MOUTH_TOP:MOUTH_TOP + 1 + k, MOUTH_COLS[0]:MOUTH_COLS[1]] = True
        out[f"mouth_{k}"] = m
    return out


def render_face(identity: Identity, opening: int = 0, eyes_open: bool = True) -> np.ndarray:
    """One frame float32 [3, 32, 32] in [0, 1]: the head in its colour, eyes and mouth black."""
    if not 0 <= opening <= MAX_OPENING:
        raise ValueError(f"mouth opening must be in 0…{MAX_OPENING}, got {opening}")
    feats = feature_masks()
    face = head_masks()[identity.shape] & ~feats["eyes_open" if eyes_open else "eyes_closed"] & ~feats[f"mouth_{opening}"]
    return (face[None].astype(np.float32) * np.asarray(identity.colour, np.float32)[:, None, None]).astype(np.float32)


def render_faces(identity: Identity, openings: np.ndarray, eyes_open: np.ndarray) -> np.ndarray:
    """Frames float32 [N, 3, 32, 32] for per-frame openings [N] and eye states [N]."""
    return np.stack([render_face(identity, int(k), bool(e)) for k, e in zip(openings, eyes_open)])


def reference_frame(identity: Identity) -> np.ndarray:
    """The reference the model is given: the face at rest (mouth closed, eyes open), [3, 32, 32]."""
    return render_face(identity, 0, True)


def identity_from_image(image: np.ndarray) -> Identity:
    """Any picture of a face (uint8 [H, W, 3], e.g. one coloured disc on black) → the world's identity.

    Foreground = pixels whose largest channel exceeds a quarter of the image's brightest; its bounding box is
    scaled (aspect kept) onto each outline's height, and the head shape is the outline with the best IoU. The colour is the
    foreground's median, brightened so its largest channel is at least MIN_BRIGHTNESS. An image with no
    foreground is refused."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or min(img.shape[:2]) < 4:
        raise ValueError(f"a reference image must be uint8 [H, W, 3] of at least 4×4 px, got {img.dtype} {img.shape}")
    x = img.astype(np.float32) / 255.0
    level = x.max(axis=2)
    if level.max() < 0.05:
        raise ValueError("the reference image is black: it shows no face (nothing brighter than black)")
    fg = level > 0.25 * level.max()
    rows, cols = np.nonzero(fg)
    colour = np.median(x[fg], axis=0)
    colour = colour * max(1.0, MIN_BRIGHTNESS / max(float(colour.max()), 1e-6))
    crop = fg[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    ious = {shape: _fit_iou(crop, mask) for shape, mask in head_masks().items()}
    best = max(HEAD_SHAPES, key=lambda shape: ious[shape])
    return Identity(tuple(float(v) for v in np.clip(colour, 0.0, 1.0)), best)


def _fit_iou(crop: np.ndarray, mask: np.ndarray) -> float:
    """IoU of a foreground crop scaled uniformly to the outline's height and centred on it (aspect kept, so
    a disc does not fit the oval)."""
    r, c = np.nonzero(mask)
    height = int(r.max() - r.min() + 1)
    width = max(1, min(FRAME_SIZE, round(crop.shape[1] * height / crop.shape[0])))
    rr = ((np.arange(height) + 0.5) * crop.shape[0] / height).astype(int).clip(0, crop.shape[0] - 1)
    cc = ((np.arange(width) + 0.5) * crop.shape[1] / width).astype(int).clip(0, crop.shape[1] - 1)
    placed = np.zeros_like(mask)
    c0 = (FRAME_SIZE - width) // 2
    placed[r.min():r.min() + height, c0:c0 + width] = crop[rr][:, cc]
    return float((placed & mask).sum() / max(1, (placed | mask).sum()))
