"""Geometry, state and rendering of the procedural world (contract: docs/world.md).

A frame is 32×32 RGB on black with exactly one filled, aliased object. The object's anchor is the
centre of a 4×4 token; its 12×12 px box is exactly the 3×3 tokens around the anchor. It moves one
token (4 px) per frame on a torus.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from .vocab import COLOURS, DIRECTIONS, PALETTE_ARRAY, SHAPES, Prompt

FRAME_SIZE = 32          # frames are FRAME_SIZE × FRAME_SIZE
CHANNELS = 3
TOKEN_SIZE = 4           # the model's patch: 4×4 px
GRID = FRAME_SIZE // TOKEN_SIZE  # 8×8 token positions
SPEED_TOKENS = 1         # tokens per frame
SPEED_PX = SPEED_TOKENS * TOKEN_SIZE  # 4 px per frame
FPS = 8                  # the world clock: frames per second of world time
OBJECT_BOX = 12          # px; the object's box = 3×3 tokens centred on its token

# (drow, dcol) per direction, in DIRECTIONS order; rows grow downwards (image coordinates).
DIRECTION_DELTAS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
DIRECTION_DELTA_ARRAY = np.array([DIRECTION_DELTAS[d] for d in DIRECTIONS], dtype=np.int64)  # [4, 2]


def _local_masks() -> dict[str, np.ndarray]:
    """The three shapes in their 12×12 box; pixel (i, j) has its centre at (i - 5.5, j - 5.5) from the anchor."""
    off = np.arange(OBJECT_BOX) - (OBJECT_BOX - 1) / 2  # -5.5 … 5.5
    dy, dx = np.meshgrid(off, off, indexing="ij")
    circle = dy**2 + dx**2 <= 5.75**2                  # 12-px disc, 112 px
    square = np.ones((OBJECT_BOX, OBJECT_BOX), bool)   # 12×12, 144 px: exactly 3×3 tokens
    triangle = np.zeros((OBJECT_BOX, OBJECT_BOX), bool)  # apex up, base 12, height 12, 84 px
    for i in range(OBJECT_BOX):
        half = i // 2 + 1                               # widths 2,2,4,4,…,12,12
        triangle[i, 6 - half:6 + half] = True
    return {"circle": circle, "square": square, "triangle": triangle}


@lru_cache(maxsize=None)
def local_shape_masks() -> np.ndarray:
    """[3, 12, 12] bool, SHAPES order (read-only)."""
    m = _local_masks()
    out = np.stack([m[s] for s in SHAPES])
    out.flags.writeable = False
    return out


@lru_cache(maxsize=None)
def shape_template(shape_index: int, height: int = FRAME_SIZE, width: int = FRAME_SIZE) -> np.ndarray:
    """[H, W] bool: the shape anchored at token (0, 0), i.e. its box covers pixels -4…7 (wrapped)."""
    f = np.zeros((height, width), bool)
    f[:OBJECT_BOX, :OBJECT_BOX] = local_shape_masks()[shape_index]
    f = np.roll(f, (-TOKEN_SIZE, -TOKEN_SIZE), axis=(0, 1))
    f.flags.writeable = False
    return f


@lru_cache(maxsize=None)
def shape_masks() -> np.ndarray:
    """[3, GRID, GRID, 32, 32] bool: every shape at every token position, pre-rendered once (read-only)."""
    out = np.zeros((len(SHAPES), GRID, GRID, FRAME_SIZE, FRAME_SIZE), bool)
    for s in range(len(SHAPES)):
        base = shape_template(s)
        for r in range(GRID):
            for c in range(GRID):
                out[s, r, c] = np.roll(base, (r * TOKEN_SIZE, c * TOKEN_SIZE), axis=(0, 1))
    out.flags.writeable = False
    return out


@lru_cache(maxsize=None)
def _flat_masks(dtype: str) -> np.ndarray:
    """[3 * 64, 1024] masks in `dtype` (row = shape * 64 + row * 8 + col), for gathers."""
    out = shape_masks().reshape(len(SHAPES) * GRID * GRID, FRAME_SIZE * FRAME_SIZE).astype(dtype)
    out.flags.writeable = False
    return out


PALETTE_UINT8 = (PALETTE_ARRAY * 255).astype(np.uint8)
PALETTE_UINT8.flags.writeable = False


@dataclass(frozen=True)
class WorldState:
    """The whole world at one frame: the prompt in force and the object's token position (0…7 each)."""

    prompt: Prompt
    row: int
    col: int

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, Prompt):
            raise TypeError(f"prompt must be a Prompt, got {type(self.prompt).__name__}")
        for name in ("row", "col"):
            v = getattr(self, name)
            if int(v) != v or not 0 <= v < GRID:
                raise ValueError(f"{name} must be an integer token position 0…{GRID - 1}, got {v!r}")
            object.__setattr__(self, name, int(v))

    def with_prompt(self, prompt: Prompt) -> "WorldState":
        return WorldState(prompt, self.row, self.col)


def step(state: WorldState, prompt: Prompt | None = None) -> WorldState:
    """The next frame's state: optionally switch to `prompt` first, then move one token in the
    (new) prompt's direction, wrapping around the torus."""
    if prompt is not None:
        state = state.with_prompt(prompt)
    dr, dc = DIRECTION_DELTAS[state.prompt.direction]
    return WorldState(state.prompt, (state.row + dr * SPEED_TOKENS) % GRID, (state.col + dc * SPEED_TOKENS) % GRID)


def object_mask(state: WorldState) -> np.ndarray:
    """[32, 32] bool: the object's pixels."""
    return shape_masks()[SHAPES.index(state.prompt.shape), state.row, state.col]


def render(state: WorldState, dtype: type | np.dtype = np.float32) -> np.ndarray:
    """[3, 32, 32] frame: float32 in {0, 1} (default) or uint8 in {0, 255} (dtype=np.uint8)."""
    return render_states([state], dtype=dtype)[0]


def render_indices(shape: np.ndarray, colour: np.ndarray, row: np.ndarray, col: np.ndarray,
                   dtype: type | np.dtype = np.float32) -> np.ndarray:
    """Vectorised render: integer index arrays of one common shape S → frames [*S, 3, 32, 32]."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        masks, palette = _flat_masks("uint8"), PALETTE_UINT8
    elif dtype.kind == "f":
        masks, palette = _flat_masks(dtype.str), PALETTE_ARRAY.astype(dtype, copy=False)
    else:
        raise ValueError(f"frames are float or uint8, not {dtype}")
    idx = (np.asarray(shape) * GRID + np.asarray(row)) * GRID + np.asarray(col)
    m = masks[idx]                                  # [*S, 1024]
    c = palette[np.asarray(colour)]                 # [*S, 3]
    out = m[..., None, :] * c[..., :, None]         # [*S, 3, 1024]
    return out.reshape(*idx.shape, CHANNELS, FRAME_SIZE, FRAME_SIZE)


def render_states(states: Sequence[WorldState], dtype: type | np.dtype = np.float32) -> np.ndarray:
    """[T, 3, 32, 32] frames of a sequence of states."""
    shape = np.array([SHAPES.index(s.prompt.shape) for s in states], dtype=np.int64)
    colour = np.array([COLOURS.index(s.prompt.colour) for s in states], dtype=np.int64)
    row = np.array([s.row for s in states], dtype=np.int64)
    col = np.array([s.col for s in states], dtype=np.int64)
    return render_indices(shape, colour, row, col, dtype=dtype)


def rollout(prompts: Sequence[Prompt], row: int = 0, col: int = 0) -> list[WorldState]:
    """States for a per-frame prompt timeline: frame 0 is `prompts[0]` at (row, col); frame t is frame
    t-1 switched to prompts[t] and moved one token in prompts[t]'s direction."""
    if not prompts:
        return []
    states = [WorldState(prompts[0], row, col)]
    for p in prompts[1:]:
        states.append(step(states[-1], p))
    return states


def render_stream(prompts: Sequence[Prompt], row: int = 0, col: int = 0,
                  dtype: type | np.dtype = np.float32) -> tuple[np.ndarray, list[WorldState]]:
    """Ground-truth frames [T, 3, 32, 32] and states for a per-frame prompt timeline (see rollout)."""
    states = rollout(prompts, row, col)
    return render_states(states, dtype=dtype), states
