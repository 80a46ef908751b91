"""What drives the face per video frame (contract: docs/avatar_world.md): the audio of that frame and an idle
blink schedule.

The clock: FPS video frames per second, 16 kHz mono audio, so video frame n is driven by audio samples
[n·S, (n+1)·S) with S = SAMPLES_PER_FRAME = 1000 — the same instant, no look-ahead, no lag.

- Loudness: RMS level of the frame's samples in dBFS. The mouth opening is that level on a 6 dB ladder
  from OPEN_DB (closed below it, i.e. in silence) to MAX_OPENING at OPEN_DB + 6·MAX_OPENING dB.
- Drive features (the model's per-frame input, cheap and local, nothing downloaded): MEL_BANDS log-mel
  band energies of the frame, its loudness, and the blink flag, each scaled to about [0, 1].
- Blinks: the eyes close for BLINK_FRAMES frames at intervals drawn from a seeded generator, so the
  avatar never freezes in silence; the schedule is an input (like LiveAvatar's pose condition), not
  something the model has to invent.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..audio import SAMPLE_RATE
from .face import MAX_OPENING

FPS = 16
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 1000
OPEN_DB = -44.0  # the mouth opens at this level (dBFS); silence and breath stay below it
DB_PER_LEVEL = 6.0
FLOOR_DB = -80.0  # levels below are clipped here (digital silence would be −inf)
MEL_BANDS = 8
MEL_RANGE_HZ = (80.0, 7600.0)
BLINK_FRAMES = 3
BLINK_INTERVAL_S = (2.0, 5.0)
DRIVE_DIM = MEL_BANDS + 2  # mel bands, loudness, blink


def frame_count(num_samples: int) -> int:
    """Video frames a clip of `num_samples` samples drives (a partial last frame counts)."""
    return -(-num_samples // SAMPLES_PER_FRAME)


def _frames(samples: np.ndarray, frames: int | None = None) -> np.ndarray:
    """Samples [N] → [frames, SAMPLES_PER_FRAME], zero-padded at the end (silence past the audio)."""
    x = np.asarray(samples, np.float32).reshape(-1)
    n = frame_count(len(x)) if frames is None else frames
    out = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
    m = min(len(x), len(out))
    out[:m] = x[:m]
    return out.reshape(n, SAMPLES_PER_FRAME)


def loudness_db(samples: np.ndarray, frames: int | None = None) -> np.ndarray:
    """Per video frame, the RMS level of its samples in dBFS (≥ FLOOR_DB), float32 [frames]."""
    f = _frames(samples, frames).astype(np.float64)
    return np.maximum(10 * np.log10(np.mean(f * f, axis=1) + 1e-12), FLOOR_DB).astype(np.float32)


def opening_for_db(db: np.ndarray) -> np.ndarray:
    """The world's mouth rule: 0 below OPEN_DB, then one px row per DB_PER_LEVEL dB, capped at MAX_OPENING."""
    level = np.floor((np.asarray(db, np.float64) - OPEN_DB) / DB_PER_LEVEL) + 1
    return np.clip(level, 0, MAX_OPENING).astype(np.int64)


def mouth_openings(samples: np.ndarray, frames: int | None = None) -> np.ndarray:
    """Ground-truth mouth opening per video frame for these samples, int [frames]."""
    return opening_for_db(loudness_db(samples, frames))


@lru_cache(maxsize=None)
def mel_filters() -> np.ndarray:
    """Triangular mel filters [MEL_BANDS, 513] over the 1024-point FFT of one frame at 16 kHz."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(MEL_RANGE_HZ[0]), mel(MEL_RANGE_HZ[1]), MEL_BANDS + 2))
    freqs = np.fft.rfftfreq(1024, 1.0 / SAMPLE_RATE)
    bank = np.zeros((MEL_BANDS, len(freqs)))
    for b in range(MEL_BANDS):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        bank[b] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0.0, None)
    return bank


def drive_features(samples: np.ndarray, blinks: np.ndarray | None = None, frames: int | None = None) -> np.ndarray:
    """Per video frame: [MEL_BANDS log-mel energies, loudness, blink] scaled to about [0, 1], float32
    [frames, DRIVE_DIM]. Frame n depends on its own samples only (causal, push-size invariant)."""
    f = _frames(samples, frames)
    n = len(f)
    window = np.hanning(SAMPLES_PER_FRAME).astype(np.float32)
    power = np.abs(np.fft.rfft(f * window, n=1024, axis=1)) ** 2 / SAMPLES_PER_FRAME
    mel_db = 10 * np.log10(power @ mel_filters().T + 1e-10)
    out = np.empty((n, DRIVE_DIM), np.float32)
    out[:, :MEL_BANDS] = np.clip((mel_db - FLOOR_DB) / -FLOOR_DB, 0.0, 1.5)
    out[:, MEL_BANDS] = (loudness_db(samples, n) - FLOOR_DB) / -FLOOR_DB
    out[:, MEL_BANDS + 1] = 0.0 if blinks is None else np.asarray(blinks, np.float32)[:n]
    return out


class BlinkSchedule:
    """A stream's blinks: the eyes close for BLINK_FRAMES frames, separated by intervals drawn uniformly from
    BLINK_INTERVAL_S by a generator seeded with the stream's seed (the first blink after half an interval).

    `window(start, frames)` → eyes closed (True) per frame for frames start … start+frames−1. A pure function of
    (seed, frame); the object keeps its place, so a stream asking for window after window draws each blink
    once (a window before the previous one starts over from frame 0)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._restart()

    def _restart(self) -> None:
        self._rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xB1].copy())
        self._at = self._interval() // 2  # start of the first blink that ends after `_start`
        self._start = 0

    def _interval(self) -> int:
        lo, hi = (int(s * FPS) for s in BLINK_INTERVAL_S)
        return int(self._rng.integers(lo, hi + 1))

    def window(self, start: int, frames: int) -> np.ndarray:
        if start < self._start:
            self._restart()
        self._start, end = start, start + frames
        closed = np.zeros(frames, bool)
        while self._at < end:
            a, b = max(self._at, start), min(self._at + BLINK_FRAMES, end)
            if a < b:
                closed[a - start:b - start] = True
            if self._at + BLINK_FRAMES > end:  # it goes on in the next window
                break
            self._at += BLINK_FRAMES + self._interval()
        return closed


def blink_schedule(seed: int, frames: int, start: int = 0) -> np.ndarray:
    """Eyes closed (True) per frame for frames start … start+frames−1 of a stream with this seed (`BlinkSchedule`)."""
    return BlinkSchedule(seed).window(start, frames)


def babble(seed: int, seconds: float) -> np.ndarray:
    """Speech-like training audio, 16 kHz float32: syllables (voiced harmonics or noise bursts, 60–300 ms,
    levels −50…−8 dBFS under a smooth envelope) separated by pauses, some of them long silences."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xBA].copy())
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n, np.float32)
    at = int(rng.integers(0, SAMPLE_RATE // 4))
    while at < n:
        length = int(rng.uniform(0.06, 0.3) * SAMPLE_RATE)
        t = np.arange(length) / SAMPLE_RATE
        if rng.random() < 0.7:
            f0 = rng.uniform(90, 300)
            wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 8))
        else:
            wave = rng.standard_normal(length)
        env = np.sin(np.pi * np.linspace(0, 1, length)) ** rng.uniform(0.3, 2.0)
        gain = 10 ** (rng.uniform(-50, -8) / 20) * np.sqrt(2)
        seg = (wave / (np.sqrt(np.mean(wave**2)) + 1e-9) * env * gain).astype(np.float32)
        end = min(n, at + length)
        out[at:end] += seg[:end - at]
        pause = rng.choice([rng.uniform(0.0, 0.08), rng.uniform(0.2, 1.5)], p=[0.75, 0.25])
        at = end + int(pause * SAMPLE_RATE)
    out += (rng.standard_normal(n) * 10 ** (rng.uniform(-75, -60) / 20)).astype(np.float32)  # room noise
    return np.clip(out, -1.0, 1.0)
