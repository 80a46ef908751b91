"""An audio-driven bundle judged by the avatar world's checker (docs/avatar_world.md): streams generated
through the real Stream API (driven execution, sink prefill, window) from a reference picture and audio.
The training eval hook; `streamgen eval --model embedded-avatar` adds drift and the report
(streamgen/evaluation/avatar.py).

Each run: a random identity drawn as a user would give it (a disc, square or ellipse of its colour, at a
random size on a black picture of another size, so the reference path is exercised too), speech-like
audio (`babble`, or a WAV such as espeak-ng speech), the stream's own blink schedule. Scores per run from
`score_clip`; the summary pools them: lip-sync correlation (lag 0), lag (frames), mouth opening in speech
vs silence, identity (colour and head shape), eyes following the blink schedule, frames per second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE
from ..avatar_world import SAMPLES_PER_FRAME, Identity, babble, blink_schedule, random_identity, score_clip
from ..engine.driven import AudioBuffer, use_drive
from ..engine.frame_stream import FrameStream

WARM_UP_FRAMES = 3  # the first chunk is left out of the scores (it has no previous chunk)


def user_picture(identity: Identity, rng: np.random.Generator) -> np.ndarray:
    """The identity as a user's picture: its outline's kind (disc, square, tall ellipse) filled with its
    colour, at a random size and aspect-true, on a black uint8 picture of random size."""
    h, w = int(rng.integers(48, 400)), int(rng.integers(48, 400))
    size = rng.uniform(0.4, 0.9) * min(h, w) / 2
    yy, xx = np.mgrid[:h, :w]
    dy, dx = (yy + 0.5 - h / 2) / size, (xx + 0.5 - w / 2) / size
    mask = {"round": dy**2 + dx**2 <= 1, "square": (np.abs(dy) <= 0.88) & (np.abs(dx) <= 0.88),
            "oval": (dx / 0.63) ** 2 + dy**2 <= 1}[identity.shape]
    img = np.zeros((h, w, 3), np.uint8)
    img[mask] = np.round(np.asarray(identity.colour) * 255).astype(np.uint8)
    return img


def generate(bundle, picture: np.ndarray, samples: np.ndarray, frames: int, seed: int) -> tuple[np.ndarray, float]:
    """Frames uint8 [frames, H, W, 3] of a driven stream, and its frames per second."""
    stream = FrameStream(bundle, "", {"seed": seed})
    audio = AudioBuffer(SAMPLE_RATE, None)
    use_drive(stream.stream, audio, bundle.avatar, picture)
    audio.push(samples)
    out, start = [], time.perf_counter()
    while sum(len(c) for c in out) < frames:
        out.append(stream.next().frames.numpy())
    elapsed = time.perf_counter() - start
    return np.concatenate(out)[:frames], frames / elapsed


@dataclass
class StreamRun:
    """One evaluated stream: who (identity), what drove it (samples, the stream's seed and so its blinks), what came out."""

    identity: Identity
    samples: np.ndarray
    seed: int
    video: np.ndarray
    frames_per_s: float

    @property
    def blinks(self) -> np.ndarray:
        return blink_schedule(self.seed, len(self.video))


def run_stream(bundle, rng: np.random.Generator, frames: int, samples: np.ndarray | None = None) -> StreamRun:
    """A random identity given as a user picture, `samples` (default: babble drawn from `rng`), a drawn stream seed."""
    identity = random_identity(rng)
    if samples is None:
        samples = babble(int(rng.integers(0, 2**31)), frames * SAMPLES_PER_FRAME / SAMPLE_RATE)
    seed = int(rng.integers(0, 2**31))
    video, fps = generate(bundle, user_picture(identity, rng), samples, frames, seed)
    return StreamRun(identity, samples, seed, video, fps)


def evaluate_avatar(bundle, clips: int = 8, frames: int = 96, seed: int = 0,
                    audio: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Score `clips` streams of `frames` frames (audio: babble per clip, or the given 16 kHz clips, cycled)."""
    runs = []
    for i in range(clips):
        given = None if audio is None else np.asarray(audio[i % len(audio)], np.float32)
        run = run_stream(bundle, np.random.default_rng([seed, i, 0xE7]), frames, given)
        scores = score_clip(run.video, run.samples, run.identity, run.blinks, skip=WARM_UP_FRAMES)
        runs.append({"identity": {"colour": list(run.identity.colour), "shape": run.identity.shape}, "seed": run.seed,
                     "frames_per_s": run.frames_per_s, **scores})
    return {"summary": summarise(runs), "runs": runs}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in runs])) if runs else 0.0

    lags = [r["lag_frames"] for r in runs]
    return {"runs": len(runs), "lipsync_corr": mean("lipsync_corr"), "lag_frames_median": float(np.median(lags)) if lags else 0.0,
            "lag_within_1": float(np.mean([abs(x) <= 1 for x in lags])) if lags else 0.0,
            "mouth_speech": mean("mouth_speech"), "mouth_silence": mean("mouth_silence"), "opening_mae": mean("opening_mae"),
            "identity": mean("identity"), "colour_match": mean("colour_match"), "shape_match": mean("shape_match"),
            "eyes_match": mean("eyes_match"), "jitter": mean("jitter"), "frames_per_s": mean("frames_per_s")}


def format_avatar_summary(s: dict[str, Any]) -> str:
    return (f"lip-sync r {s['lipsync_corr']:.2f}, lag median {s['lag_frames_median']:+.0f} (|lag|≤1 {s['lag_within_1']:.0%}), "
            f"mouth speech {s['mouth_speech']:.2f} / silence {s['mouth_silence']:.2f}, identity {s['identity']:.0%} "
            f"(colour {s['colour_match']:.0%}, shape {s['shape_match']:.0%}), eyes {s['eyes_match']:.0%}, "
            f"{s['frames_per_s']:.0f} frames/s")
