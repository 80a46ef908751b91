"""Random clips of the world, with mid-clip prompt switches: one clip (make_clip) or a batch for
training (sample_batch). Both come from the same vectorised sampler (sample_clips), so
make_clip(seed, …) is clip 0 of sample_batch(seed, 1, …)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from .render import DIRECTION_DELTA_ARRAY, GRID, SPEED_TOKENS, WorldState, render_indices
from .vocab import COLOURS, DIRECTIONS, SHAPES, TOKEN_OFFSET, Prompt

SeedLike = Union[int, np.integer, np.random.Generator, np.random.SeedSequence]

N_COLOURS, N_SHAPES, N_DIRECTIONS = len(COLOURS), len(SHAPES), len(DIRECTIONS)


def as_rng(seed: SeedLike) -> np.random.Generator:
    """A Generator is used as is (and advanced); anything else seeds a fresh PCG64."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise TypeError("a seed is required (the world is deterministic); pass an int or a numpy Generator")
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class ClipBatch:
    """Index-level description of B clips of T frames (all arrays int64 numpy).

    colour/shape/direction: [B, T] indices into COLOURS/SHAPES/DIRECTIONS (the prompt in force per frame).
    row/col: [B, T] token position of the object. switch_frame: [B], -1 when the clip has no switch.
    changed: [B, 3] bool, which attributes (ATTRIBUTES order) change at the switch (all False without one).
    """

    colour: np.ndarray
    shape: np.ndarray
    direction: np.ndarray
    row: np.ndarray
    col: np.ndarray
    switch_frame: np.ndarray
    changed: np.ndarray

    @property
    def batch(self) -> int:
        return self.colour.shape[0]

    @property
    def frames(self) -> int:
        return self.colour.shape[1]

    def video(self, dtype: type | np.dtype = np.float32) -> np.ndarray:
        """[B, T, 3, 32, 32] frames (float in {0,1} or uint8 in {0,255})."""
        return render_indices(self.shape, self.colour, self.row, self.col, dtype=dtype)

    def tokens(self) -> np.ndarray:
        """[B, T, 3] prompt token ids per frame: [colour_id, shape_id, direction_id]."""
        return np.stack([self.colour + TOKEN_OFFSET["colour"], self.shape + TOKEN_OFFSET["shape"],
                         self.direction + TOKEN_OFFSET["direction"]], axis=-1)

    def prompts(self, b: int) -> list[Prompt]:
        cache: dict[tuple[int, int, int], Prompt] = {}
        out = []
        for key in zip(self.colour[b].tolist(), self.shape[b].tolist(), self.direction[b].tolist()):
            if key not in cache:
                cache[key] = Prompt.from_indices(*key)
            out.append(cache[key])
        return out

    def states(self, b: int) -> list[WorldState]:
        return [WorldState(p, r, c) for p, r, c in zip(self.prompts(b), self.row[b].tolist(), self.col[b].tolist())]

    def switch(self, b: int) -> Optional[int]:
        s = int(self.switch_frame[b])
        return None if s < 0 else s


def sample_clips(seed: SeedLike, batch: int, frames: int, switch_prob: float = 0.3, *,
                 switch_align: int = 1) -> ClipBatch:
    """Sample B clips of T frames.

    Each clip: a uniformly random prompt (colour, shape, direction) and token position. With
    probability `switch_prob` (and T ≥ 2) the prompt switches once, at a frame s drawn uniformly from
    the multiples of `switch_align` in [1, T-1]: a uniformly random non-empty subset of
    {colour, shape, direction} changes, each to a uniformly random *different* value. Frame t ≥ 1 is
    frame t-1 moved one token in the direction of the prompt in force at t (so the switch frame already
    shows the new colour/shape and the new motion; the object continues from where it was).

    The same draws are made whatever `switch_prob` is, so a seed fixes the start prompt and position.
    """
    if batch < 0 or frames < 1:
        raise ValueError(f"need batch ≥ 0 and frames ≥ 1, got batch={batch}, frames={frames}")
    if not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
    if switch_align < 1:
        raise ValueError(f"switch_align must be ≥ 1, got {switch_align}")
    rng = as_rng(seed)
    B, T = batch, frames
    base = np.stack([rng.integers(0, N_COLOURS, B), rng.integers(0, N_SHAPES, B), rng.integers(0, N_DIRECTIONS, B)], 1)
    pos0 = rng.integers(0, GRID, (B, 2))
    has_switch = rng.random(B) < switch_prob
    n_candidates = (T - 1) // switch_align
    s = switch_align * rng.integers(1, max(n_candidates, 1) + 1, B)
    subset = rng.integers(1, 8, B)  # bit 0 colour, bit 1 shape, bit 2 direction: uniform non-empty subset
    bump = np.stack([rng.integers(1, N_COLOURS, B), rng.integers(1, N_SHAPES, B), rng.integers(1, N_DIRECTIONS, B)], 1)

    if n_candidates < 1:
        has_switch[:] = False
    changed = ((subset[:, None] >> np.arange(3)) & 1).astype(bool) & has_switch[:, None]        # [B, 3]
    sizes = np.array([N_COLOURS, N_SHAPES, N_DIRECTIONS])
    new = np.where(changed, (base + bump) % sizes, base)                                        # [B, 3]
    after = np.arange(T)[None, :] >= np.where(has_switch, s, T)[:, None]                        # [B, T]
    attrs = np.where(after[:, :, None], new[:, None, :], base[:, None, :])                      # [B, T, 3]
    colour, shape, direction = attrs[..., 0], attrs[..., 1], attrs[..., 2]

    moves = DIRECTION_DELTA_ARRAY[direction[:, 1:]] * SPEED_TOKENS                              # [B, T-1, 2]
    pos = np.concatenate([pos0[:, None, :], pos0[:, None, :] + np.cumsum(moves, axis=1)], axis=1) % GRID
    return ClipBatch(colour=colour, shape=shape, direction=direction, row=pos[..., 0], col=pos[..., 1],
                     switch_frame=np.where(has_switch, s, -1), changed=changed)


class Clip(NamedTuple):
    """One clip: frames [T, 3, 32, 32] float32, the prompt in force per frame, the switch frame or None."""

    frames: np.ndarray
    prompts: list[Prompt]
    switch_frame: Optional[int]


def make_clip(rng: SeedLike, frames: int, switch_prob: float = 0.3, *, switch_align: int = 1,
              dtype: type | np.dtype = np.float32) -> Clip:
    """One random clip (see sample_clips for the distribution); `rng` is a seed or a numpy Generator."""
    cb = sample_clips(rng, 1, frames, switch_prob, switch_align=switch_align)
    return Clip(cb.video(dtype)[0], cb.prompts(0), cb.switch(0))


def sample_batch(seed: SeedLike, batch: int, frames: int, switch_prob: float = 0.3, *, switch_align: int = 1,
                 dtype: torch.dtype = torch.float32, with_meta: bool = False):
    """Training batch: (video [B, T, 3, 32, 32] torch `dtype` (float32 in {0,1} or uint8 in {0,255}),
    prompt token ids [B, T, 3] int64), plus the ClipBatch when `with_meta`. Deterministic in `seed`."""
    cb = sample_clips(seed, batch, frames, switch_prob, switch_align=switch_align)
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                torch.uint8: np.uint8}.get(dtype)
    if np_dtype is None:
        if dtype == torch.bfloat16:
            video = torch.from_numpy(cb.video(np.float32)).to(torch.bfloat16)
        else:
            raise ValueError(f"unsupported dtype {dtype}")
    else:
        video = torch.from_numpy(cb.video(np_dtype))
    tokens = torch.from_numpy(cb.tokens())
    return (video, tokens, cb) if with_meta else (video, tokens)


__all__ = ["Clip", "ClipBatch", "SeedLike", "as_rng", "make_clip", "sample_batch", "sample_clips"]
