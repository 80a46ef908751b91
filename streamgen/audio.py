"""Audio files and sample rates: integer-PCM WAV reading and band-limited resampling to 16 kHz mono,
the rate every audio-driven model here takes (wav2vec2 for LiveAvatar, log-mel drive features for the
embedded avatar)."""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SAMPLE_RATE = 16000


def resample(samples, orig_sr: int, new_sr: int = SAMPLE_RATE, *, zero_crossings: int = 32,
             rolloff: float = 0.945, beta: float = 14.0) -> Tensor:
    """Band-limited polyphase resampling along the last axis (Kaiser-windowed sinc, float64 inside).

    Output length `ceil(N · new_sr / orig_sr)`, the length librosa gives. The reference resamples with librosa's
    default (soxr 'HQ'); this filter is a different design with the same purpose, so results agree to the
    filters' passband ripple, not bit for bit. `rolloff` is the cutoff as a fraction of the lower Nyquist."""
    x = torch.as_tensor(np.asarray(samples) if not isinstance(samples, Tensor) else samples)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} → {new_sr}")
    if orig_sr == new_sr:
        return x.to(torch.float32).clone()
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    shape, n = x.shape[:-1], x.shape[-1]
    x64 = x.reshape(-1, n).to(torch.float64)
    fc = min(1.0, up / down) * rolloff  # cutoff in cycles per input sample × 2 (1.0 = input Nyquist)
    half = zero_crossings / fc  # filter half-width in input samples
    w = math.ceil(half)
    # Output q·up + j sits at input time q·down + j·down/up; it reads input samples q·down + i, i ∈ [−w, down+w).
    t = (torch.arange(up, dtype=torch.float64)[:, None] * down / up
         - torch.arange(-w, down + w, dtype=torch.float64)[None, :])
    inside = t.abs() <= half
    window = torch.special.i0(beta * torch.sqrt((1 - (t / half) ** 2).clamp(min=0))) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64))
    kernel = torch.where(inside, fc * torch.sinc(fc * t) * window, torch.zeros_like(t))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # unit DC gain for every phase
    n_out = math.ceil(n * up / down)
    q = math.ceil(n_out / up)
    right = max(0, (q - 1) * down + kernel.shape[1] - w - n)
    padded = F.pad(x64, (w, right))
    out = F.conv1d(padded[:, None], kernel[:, None], stride=down)[..., :q]  # [B, up, q]
    return out.transpose(1, 2).reshape(x64.shape[0], -1)[:, :n_out].reshape(*shape, n_out).to(torch.float32)


def read_wav(path: str | Path) -> tuple[Tensor, int]:
    """An integer-PCM WAV file as float32 `[channels, N]` in [−1, 1) and its sample rate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except wave.Error as e:
        raise ValueError(f"{path}: not an integer-PCM WAV file ({e}); convert it to 16-bit PCM WAV") from e
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        data = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        data = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    return torch.from_numpy(data.reshape(-1, channels).T.copy()), rate


def load_audio(path: str | Path) -> Tensor:
    """A WAV file as the reference loads it (`librosa.load(path, sr=16000)`): channels averaged to mono, then
    resampled to 16 kHz. Returns float32 `[N]`."""
    data, rate = read_wav(path)
    return resample(data.mean(dim=0), rate, SAMPLE_RATE)


def write_wav(path: str | Path, samples, rate: int) -> Path:
    """Mono 16-bit PCM WAV: int16 samples as they are, float samples in [−1, 1] scaled (and clipped)."""
    x = np.asarray(samples)
    pcm = x.astype("<i2") if x.dtype == np.int16 else (np.clip(x.astype(np.float64), -1.0, 1.0) * 32767).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return path
