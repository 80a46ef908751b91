"""World clips as training batches: latents, per-chunk prompt ids, switch chunks; prompt timelines
for rollouts; the world as teacher for a generated context (detect the object, advance, render)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..bundles.embedded import frames_to_latents
from ..world import GRID, sample_batch, sample_clips
from ..world.checker import FG_THRESHOLD, analyze
from ..world.clips import N_COLOURS, N_DIRECTIONS, N_SHAPES
from ..world.render import (
    DIRECTION_DELTA_ARRAY,
    SPEED_TOKENS,
    TOKEN_SIZE,
    render_indices,
)
from ..world.vocab import TOKEN_OFFSET
from .config import LEAD_IN_MOTIONS

CHUNK = 3  # frames per chunk (the stream's chunk_frames)


def step_seed(seed: int, step: int, stream: int) -> int:
    """Independent, reproducible seed per (run seed, step, purpose): resuming at step n redraws step n."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class ClipBatch:
    """Latents [B, T, 3, 32, 32], prompt ids per chunk [B, chunks, 3], switch chunk per clip (−1: none),
    lead-in chunks per clip (0: none; see `clip_batch`)."""

    latents: Tensor
    chunk_tokens: Tensor
    switch_chunk: Tensor
    lead_in_chunks: Tensor

    @property
    def chunks(self) -> int:
        return self.chunk_tokens.shape[1]


def clip_batch(seed: int, batch: int, chunks: int, switch_prob: float, lead_in_prob: float = 0.0,
               lead_in_motion: str = "any") -> ClipBatch:
    """Phase-1 clips: `chunks`·3 frames, one switch in `switch_prob` of clips, at a chunk boundary.

    In `lead_in_prob` of the clips without a switch, the first 1…chunks−1 chunks (the lead-in) show
    the object holding still or moving another way than the prompt says, up to where the clip's own
    motion takes over. A model trained on the world alone continues the motion its context shows;
    at inference its context is its own first chunk, generated from noise, whose motion is arbitrary,
    so a stream kept the first chunk's direction whatever the prompt said. These clips teach it to
    move as the prompt says whatever the context did. The lead-in is context only: no loss (see
    `Trainer.phase1_inputs`). `lead_in_motion` "still" only ever holds still (the first recipe)."""
    if lead_in_motion not in LEAD_IN_MOTIONS:
        raise ValueError(f"lead_in_motion is one of {LEAD_IN_MOTIONS}, not {lead_in_motion!r}")
    video, tokens, meta = sample_batch(seed, batch, chunks * CHUNK, switch_prob, switch_align=CHUNK, with_meta=True)
    switch = torch.from_numpy(meta.switch_frame) // CHUNK
    switch[torch.from_numpy(meta.switch_frame) < 0] = -1
    latents = frames_to_latents(video)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    pick = (rng.random(batch) < lead_in_prob) & (switch.numpy() < 0) & (chunks > 1)
    lead_in = np.where(pick, rng.integers(1, max(chunks, 2), batch), 0)
    lead_dir = rng.integers(0, N_DIRECTIONS, batch)  # a lead-in never moves the prompt's way: that is a plain clip
    for b in np.flatnonzero(lead_in):
        last = int(lead_in[b]) * CHUNK - 1  # the lead-in's last frame, where the clip's own motion starts from
        still = lead_in_motion == "still" or lead_dir[b] == meta.direction[b, 0]
        delta = np.zeros(2, np.int64) if still else DIRECTION_DELTA_ARRAY[lead_dir[b]]
        back = np.arange(last, 0, -1)[:, None] * delta * SPEED_TOKENS            # frames 0…last−1
        rows, cols = (meta.row[b, last] - back[:, 0]) % GRID, (meta.col[b, last] - back[:, 1]) % GRID
        frames = render_indices(meta.shape[b, :last], meta.colour[b, :last], rows, cols)
        latents[b, :last] = frames_to_latents(torch.from_numpy(frames))
    return ClipBatch(latents, tokens[:, ::CHUNK].contiguous(), switch, torch.from_numpy(lead_in))


@dataclass
class Timeline:
    """A batch's prompt per frame and ground-truth object positions (index arrays [B, T], numpy)."""

    colour: np.ndarray
    shape: np.ndarray
    direction: np.ndarray
    row: np.ndarray
    col: np.ndarray

    def chunk_tokens(self, chunk: int) -> Tensor:
        """Prompt ids [B, 3] in force during chunk `chunk` (constant within a chunk)."""
        f = chunk * CHUNK
        ids = np.stack([self.colour[:, f] + TOKEN_OFFSET["colour"], self.shape[:, f] + TOKEN_OFFSET["shape"],
                        self.direction[:, f] + TOKEN_OFFSET["direction"]], axis=-1)
        return torch.from_numpy(ids)

    def frames(self, first: int, end: int) -> Tensor:
        """Ground-truth latents [B, end−first, 3, 32, 32]."""
        s = slice(first, end)
        video = render_indices(self.shape[:, s], self.colour[:, s], self.row[:, s], self.col[:, s])
        return frames_to_latents(torch.from_numpy(video))


def timeline(seed: int, batch: int, chunks: int, switch_chunk: int | None) -> Timeline:
    """Random prompts and start positions; when `switch_chunk` is given, every clip switches there
    (a random non-empty subset of attributes, each to a different value), as sample_clips does."""
    rng = np.random.default_rng(seed)
    T = chunks * CHUNK
    base = sample_clips(rng, batch, T, 0.0)
    attrs = np.stack([base.colour, base.shape, base.direction], axis=-1)            # [B, T, 3]
    if switch_chunk is not None:
        subset = rng.integers(1, 8, batch)
        changed = ((subset[:, None] >> np.arange(3)) & 1).astype(bool)
        sizes = np.array([N_COLOURS, N_SHAPES, N_DIRECTIONS])
        bump = np.stack([rng.integers(1, n, batch) for n in sizes], axis=1)
        new = np.where(changed, (attrs[:, 0] + bump) % sizes, attrs[:, 0])
        attrs[:, switch_chunk * CHUNK:] = new[:, None]
    moves = DIRECTION_DELTA_ARRAY[attrs[:, 1:, 2]] * SPEED_TOKENS
    pos0 = np.stack([base.row[:, 0], base.col[:, 0]], axis=-1)
    pos = np.concatenate([pos0[:, None], pos0[:, None] + np.cumsum(moves, axis=1)], axis=1) % GRID
    return Timeline(attrs[..., 0], attrs[..., 1], attrs[..., 2], pos[..., 0], pos[..., 1])


def _densest_box(fg: np.ndarray) -> np.ndarray:
    """Centre token (row, col) of the object-sized 3×3-token box (torus) holding the most foreground."""
    per_token = fg.reshape(GRID, TOKEN_SIZE, GRID, TOKEN_SIZE).sum((1, 3))
    box = sum(np.roll(per_token, (dr, dc), axis=(0, 1)) for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    return np.array(np.unravel_index(int(box.argmax()), box.shape))


def detect_positions(latent_frames: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Token position of the object in each frame [N, 3, 32, 32] (latents) and whether it was found:
    the checker's anchor when it decodes a shape; otherwise, when there is at least a token's worth
    of foreground (fragments), the centre of the object-sized box that holds most of it. A target
    that depends only on the context is one the model can learn to produce (consolidate the
    fragments where they are), unlike a random one."""
    from ..bundles.embedded import latents_to_frames

    frames = latents_to_frames(latent_frames).cpu().numpy()
    a = analyze(frames)
    fg = frames.max(axis=1) > FG_THRESHOLD
    pos = np.zeros((len(a), 2), dtype=np.int64)
    found = np.zeros(len(a), dtype=bool)
    for i in range(len(a)):
        if a.shape[i] is not None:
            pos[i] = np.rint(a.anchor[i]).astype(np.int64) % GRID
            found[i] = True
        elif a.area[i] >= TOKEN_SIZE * TOKEN_SIZE:
            pos[i] = _densest_box(fg[i])
            found[i] = True
    return pos, found


def teacher_first_chunk(tl: Timeline, own_chunk: Tensor) -> tuple[Tensor, np.ndarray]:
    """The world's version of a generated first chunk [B, 3, C, H, W]: the prompt's object where the
    model put it in frame 0, moving under the prompt (ground truth where nothing was generated)."""
    pos, found = detect_positions(own_chunk[:, 0])
    row, col = tl.row[:, 0].copy(), tl.col[:, 0].copy()
    row[found], col[found] = pos[found, 0], pos[found, 1]
    return _advance(tl, 0, row, col, include_start=True), found


def _advance(tl: Timeline, first: int, row: np.ndarray, col: np.ndarray, include_start: bool = False) -> Tensor:
    """Latents of frames first…first+2 under the timeline's prompts, starting from (row, col): at
    frame `first` itself (include_start) or one step after it."""
    s = slice(first, first + CHUNK)
    moves = DIRECTION_DELTA_ARRAY[tl.direction[:, s]] * SPEED_TOKENS                 # [B, 3, 2]
    if include_start:
        moves[:, 0] = 0
    steps = np.cumsum(moves, axis=1)
    rows, cols = (row[:, None] + steps[..., 0]) % GRID, (col[:, None] + steps[..., 1]) % GRID
    return frames_to_latents(torch.from_numpy(render_indices(tl.shape[:, s], tl.colour[:, s], rows, cols)))


def teacher_chunk(tl: Timeline, chunk: int, last_frame: Tensor) -> tuple[Tensor, np.ndarray]:
    """The world's continuation of a generated context: chunk `chunk` under the timeline's prompt,
    moving from where the object is in the last generated frame [B, 3, 32, 32]. Clips whose object
    is not found get the ground-truth continuation (a placeholder: the trainer gives them no loss).
    Returns (latents [B, 3, 3, 32, 32], found [B])."""
    f = chunk * CHUNK
    pos, found = detect_positions(last_frame)
    row, col = tl.row[:, f - 1].copy(), tl.col[:, f - 1].copy()
    row[found], col[found] = pos[found, 0], pos[found, 1]
    return _advance(tl, f, row, col), found
