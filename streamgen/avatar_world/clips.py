"""Clips of the avatar world: a random identity, speech-like audio, a blink schedule and the frames they
give — the training data of the embedded avatar model and the ground truth its checker is validated on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .drive import SAMPLES_PER_FRAME, babble, blink_schedule, drive_features, mouth_openings
from .face import HEAD_SHAPES, MIN_BRIGHTNESS, Identity, reference_frame, render_faces


@dataclass
class AvatarClip:
    """`frames` float32 [N, 3, 32, 32] in [0, 1] driven by `samples` (16 kHz) and `blinks` [N];
    `drive` [N, DRIVE_DIM] are the model's per-frame inputs, `reference` [3, 32, 32] its sink."""

    identity: Identity
    samples: np.ndarray
    blinks: np.ndarray
    frames: np.ndarray
    drive: np.ndarray
    reference: np.ndarray


def random_identity(rng: np.random.Generator) -> Identity:
    """A colour with a channel ≥ MIN_BRIGHTNESS (uniform otherwise) and one of the head shapes."""
    colour = rng.uniform(0.0, 1.0, 3)
    colour[rng.integers(0, 3)] = rng.uniform(MIN_BRIGHTNESS, 1.0)
    return Identity(tuple(float(c) for c in colour), HEAD_SHAPES[int(rng.integers(0, len(HEAD_SHAPES)))])


def make_clip(identity: Identity, samples: np.ndarray, blinks: np.ndarray) -> AvatarClip:
    """The world's frames for this identity, audio and blink schedule (one frame per SAMPLES_PER_FRAME)."""
    n = len(blinks)
    samples = np.asarray(samples, np.float32)[:n * SAMPLES_PER_FRAME]
    openings = mouth_openings(samples, n)
    frames = render_faces(identity, openings, ~np.asarray(blinks, bool))
    return AvatarClip(identity, samples, np.asarray(blinks, bool), frames, drive_features(samples, blinks, n),
                      reference_frame(identity))


def sample_clip(seed: int, frames: int) -> AvatarClip:
    """A random clip of `frames` frames: a pure function of the seed. Its blink schedule starts at a random
    offset into a stream, so clips show blinks at any position."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xC1].copy())
    identity = random_identity(rng)
    samples = babble(int(rng.integers(0, 2**31)), frames * SAMPLES_PER_FRAME / 16000)
    blinks = blink_schedule(int(rng.integers(0, 2**31)), frames, start=int(rng.integers(0, 200)))
    return make_clip(identity, samples, blinks)
