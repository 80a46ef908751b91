"""wav2vec2 audio features for LiveAvatar (spec/avatar.md §2.4 steps 1–3, §4).

Whole file (the reference's offline path): 16 kHz mono audio (a file is loaded as `librosa.load(path, sr=16000)`
does: channels averaged, resampled) → the processor's per-input zero-mean/unit-variance normalisation →
wav2vec2 with all hidden states stacked `[layers, T50, dim]` (25 × 1024 for `wav2vec2-large-xlsr-53-english`)
→ linear interpolation (align_corners) over the whole input to `T30 = int(T50 / 50 · 30)` → video frame k takes
30 Hz row `round(k · 30 / fps)`, zero vectors past the end → `[frames, layers, dim]`.

Streaming (`StreamingAudioFeatures`): audio is pushed as it arrives; video chunk k (default one 12-frame LiveAvatar
block) is computed once the audio up to its end plus a look-ahead is there, from a bounded window of past audio
that is normalised and encoded on its own, as the reference does a file (SoulX-FlashHead's rolling buffer). The
window's start is snapped to a 200 ms grid at 25 fps so the 30 Hz → video row pattern and the wav2vec hop line up
with the stream's. Its 30 Hz rows sit at their nominal 50 Hz positions by default (the reference's per-input
align_corners warp would shift them by up to ~1 wav2vec frame at a window's end). A window and look-ahead that
cover the whole stream reproduce the whole-file features of the same alignment exactly.

transformers (the `[avatar]` extra) is imported only when a model or the processor is built.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...audio import SAMPLE_RATE, load_audio, read_wav, resample  # noqa: F401  (16 kHz: wav2vec2's input rate; re-exported)
WAV2VEC_RATE = 50  # hidden-state rate: hop 320 samples (20 ms), receptive field 400 samples (25 ms)
WAV2VEC_HOP, WAV2VEC_FIELD = 320, 400
VIDEO_RATE = 30  # `AudioEncoder.video_rate`: the intermediate rate of the 50 → video-frame chain
FPS = 25  # LiveAvatar's video rate
INFER_FRAMES = 48  # frames per clip of the reference pipeline (`--infer_frames`)
MODEL_ID = "wav2vec2-large-xlsr-53-english"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_audio(samples, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """16 kHz mono samples as float32 `[N]`; anything else is refused with what is expected."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"audio at {sample_rate} Hz: the wav2vec2 features expect {SAMPLE_RATE} Hz mono samples; resample first "
            f"(streamgen.models.s2v.wav2vec.resample(x, {sample_rate}, {SAMPLE_RATE}) or load_audio(path))")
    x = torch.as_tensor(np.asarray(samples) if not isinstance(samples, Tensor) else samples)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(
            f"audio of shape {tuple(x.shape)}: expected mono samples of shape [N] (or [1, N]) at {SAMPLE_RATE} Hz; "
            "downmix multi-channel audio first (the reference averages the channels: x.mean(channel_axis))")
    if not x.is_floating_point():
        raise ValueError(f"audio of dtype {x.dtype}: expected float samples in [-1, 1] (divide int16 PCM by 32768)")
    return x.to(torch.float32)


# ------------------------------------------------------------------------------------------ frame alignment


def wav2vec_frames(num_samples: int) -> int:
    """Hidden-state frames wav2vec2 gives for N samples: floor((N − 400) / 320) + 1 (16000 → 49)."""
    return 0 if num_samples < WAV2VEC_FIELD else (num_samples - WAV2VEC_FIELD) // WAV2VEC_HOP + 1


def video_rate_frames(t50: int) -> int:
    """Rows after the 50 → 30 Hz interpolation: `int(T50 / 50 · 30)`, the reference's float expression."""
    return int(t50 / WAV2VEC_RATE * VIDEO_RATE)


ALIGNMENTS = ("reference", "nominal")


def to_video_rate(hidden: Tensor, alignment: str = "reference") -> Tensor:
    """`[layers, T50, dim]` → `[layers, T30, dim]`, T30 = int(T50 / 50 · 30), by linear interpolation.

    "reference": align_corners over the whole input, as the reference does (row i at 50 Hz position
    i·(T50−1)/(T30−1): the ends map to the ends, so the warp depends on the input's length, up to ~1 wav2vec
    frame late at the end). "nominal": row i at position i·50/30 from the input start (the same grid at its
    nominal rate; independent of the length, so a window gives the rows a whole file would)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment {alignment!r}: expected one of {ALIGNMENTS}")
    t30 = video_rate_frames(hidden.shape[1])
    if t30 == 0:
        return hidden.new_zeros(hidden.shape[0], 0, hidden.shape[2])
    if alignment == "reference":
        out = F.interpolate(hidden.transpose(1, 2), size=t30, mode="linear", align_corners=True)
        return out.transpose(1, 2)
    pos = torch.arange(t30, dtype=torch.float64) * (WAV2VEC_RATE / VIDEO_RATE)  # ≤ T50 − 5/3 for every row
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=hidden.shape[1] - 1)
    frac = (pos - lo).to(hidden.dtype)[None, :, None]
    return hidden[:, lo] * (1 - frac) + hidden[:, hi] * frac


def video_frame_rows(num_frames: int, fps: int = FPS, start: int = 0) -> list[int]:
    """The 30 Hz row of video frames start..start+num_frames−1: round(k · 30 / fps), half to even (numpy's rule;
    at 25 fps no frame is a tie)."""
    return [round(Fraction(k * VIDEO_RATE, fps)) for k in range(start, start + num_frames)]


def frames_with_audio(t30: int, fps: int = FPS) -> int:
    """How many leading video frames map to a 30 Hz row < T30 (the later ones get zero vectors)."""
    n = 0
    while round(Fraction(n * VIDEO_RATE, fps)) < t30:
        n += 1
    return n


def reference_num_frames(t30: int, fps: int = FPS, infer_frames: int = INFER_FRAMES) -> int:
    """The reference's bucket length: `num_repeat = int(T30 / (infer_frames · 30 / fps)) + 1` clips of
    `infer_frames` frames (the frames past the audio are zeros)."""
    return (int(t30 / (infer_frames * (VIDEO_RATE / fps))) + 1) * infer_frames


def align_to_video(feat30: Tensor, num_frames: int | None = None, fps: int = FPS, start: int = 0) -> Tensor:
    """`[layers, T30, dim]` → `[num_frames, layers, dim]` for video frames start.. (relative to feat30's first
    row): row round(k · 30 / fps), zero vectors where that row is past the end. `num_frames=None`: the frames
    that have audio."""
    t30 = feat30.shape[1]
    if num_frames is None:
        num_frames = max(0, frames_with_audio(t30, fps) - start)
    rows = torch.tensor(video_frame_rows(num_frames, fps, start), dtype=torch.long)
    valid = rows < t30
    out = feat30.new_zeros(num_frames, feat30.shape[0], feat30.shape[2])
    out[valid] = feat30[:, rows[valid]].transpose(0, 1)
    return out


def as_audio_emb(features: Tensor) -> Tensor:
    """`[frames, layers, dim]` → the pipeline's `audio_emb [1, layers, dim, frames]`; block b of clip r is
    `audio_emb[..., 48r+12b : 48r+12b+12]`, the input of `CausalAudioEncoder`."""
    return features.permute(1, 2, 0).unsqueeze(0)


# ---------------------------------------------------------------------------------------------- the encoder


def _check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    expected = (f"expected a local Hugging Face wav2vec2 model directory (config.json with model_type 'wav2vec2' "
                f"and one of {', '.join(_WEIGHT_FILES)}; optionally preprocessor_config.json), e.g. "
                f"<checkpoint>/{MODEL_ID}")
    if not path.is_dir():
        raise FileNotFoundError(f"wav2vec2 model directory {path} does not exist or is not a directory; {expected}")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json; {expected}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e}); {expected}") from e
    if model_type != "wav2vec2":
        raise ValueError(f"{config} has model_type {model_type!r}, not 'wav2vec2'; {expected}")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{path} has a wav2vec2 config.json but no weights; {expected}")
    return path


class Wav2Vec2AudioFeatures:
    """A wav2vec2 encoder with the reference processor's normalisation: 16 kHz mono audio → all hidden
    states, and the whole-file chain to video frames (`__call__`)."""

    def __init__(self, model, feature_extractor=None) -> None:
        if feature_extractor is None:
            from transformers import Wav2Vec2FeatureExtractor

            feature_extractor = Wav2Vec2FeatureExtractor()  # do_normalize=True, 16 kHz: the reference processor's
        if getattr(feature_extractor, "sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise ValueError(f"feature extractor expects {feature_extractor.sampling_rate} Hz, not {SAMPLE_RATE} Hz")
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.num_layers = model.config.num_hidden_layers + 1  # embedding output + every layer
        self.dim = model.config.hidden_size

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> Wav2Vec2AudioFeatures:
        """Load `Wav2Vec2Model` (a `Wav2Vec2ForCTC` checkpoint such as the reference's loads too; its CTC head is
        unused) and the processor config from a local directory. Never downloads."""
        path = _check_model_dir(model_dir)
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        model = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True).to(device=device, dtype=dtype)
        extractor = None
        if (path / "preprocessor_config.json").is_file():
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(path), local_files_only=True)
        return cls(model, extractor)

    def hidden_states(self, samples, sample_rate: int = SAMPLE_RATE) -> Tensor:
        """16 kHz mono `[N]` → `[layers, T50, dim]` float32 (T50 = floor((N − 400) / 320) + 1), normalised
        per input as the reference processor does."""
        x = check_audio(samples, sample_rate)
        if x.shape[0] < WAV2VEC_FIELD:
            raise ValueError(f"{x.shape[0]} samples: wav2vec2 needs at least {WAV2VEC_FIELD} (25 ms at 16 kHz)")
        values = self.feature_extractor(x.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        param = next(self.model.parameters())
        with torch.inference_mode():
            out = self.model(values.to(param.device, param.dtype), output_hidden_states=True)
        return torch.cat(out.hidden_states, dim=0).to(torch.float32).cpu()

    def __call__(self, samples, sample_rate: int = SAMPLE_RATE, *, num_frames: int | None = None,
                 fps: int = FPS, alignment: str = "reference") -> Tensor:
        """Whole-file features `[frames, layers, dim]` aligned to video frames at `fps` (frame k ↔ 30 Hz row
        round(k·30/fps) of the whole-input interpolation, see `to_video_rate`). `num_frames=None`: the frames
        that have audio; more frames are zero vectors, as the reference pads its last clip
        (see `reference_num_frames`)."""
        hidden = self.hidden_states(samples, sample_rate)
        return align_to_video(to_video_rate(hidden, alignment), num_frames, fps)

    def file(self, path: str | Path, **kwargs) -> Tensor:
        """`__call__` on a WAV file loaded as the reference loads it (mono, resampled to 16 kHz)."""
        return self(load_audio(path), **kwargs)


# ---------------------------------------------------------------------------------------------- streaming


class FeatureChunk(NamedTuple):
    """Features of video frames `start_frame .. start_frame + len(features) − 1`: `[frames, layers, dim]`."""

    index: int
    start_frame: int
    features: Tensor


def _grid_frames(fps: int) -> int:
    """Smallest frame count after which the 30 Hz rows and the wav2vec hop repeat exactly (5 at 25 fps)."""
    for p in range(1, 100_001):
        if (p * VIDEO_RATE) % fps == 0 and (p * WAV2VEC_RATE) % fps == 0:
            return p
    raise ValueError(f"fps {fps} has no common grid with the 30 Hz and 50 Hz audio rates")


class StreamingAudioFeatures:
    """Live wav2vec2 features per video chunk from a bounded rolling window.

    Chunk k covers video frames [k·chunk_frames, (k+1)·chunk_frames). It is emitted by `push` once the audio
    reaches the chunk's end plus `lookahead_frames` (default 4 = 160 ms = one latent frame, inside the spec's
    80–240 ms), and is computed from exactly the audio [s, end + look-ahead), where s is the end minus
    `context_s` seconds (default 8 s, SoulX-FlashHead's `cached_audio_duration`), snapped down to the
    200 ms grid (at 25 fps) and clipped at 0. That window is normalised and encoded as the reference does a
    file; its 30 Hz rows are placed by `alignment`: "nominal" (default) puts row i at 50 Hz position i·5/3, which
    is the same absolute time in every window; "reference" applies the reference's align_corners warp to the
    window (its end maps to the window's last wav2vec frame, ~1 frame late where the chunk sits).
    So chunk k never depends on audio after its look-ahead, results do not depend on how the audio was
    split into pushes, and memory stays O(context + chunk). `flush()` ends the stream: the remaining frames
    (up to the whole-file frame count) are computed with the audio there is.

    The emission delay beyond the chunk's end is `lookahead_frames / fps` seconds (plus compute)."""

    def __init__(self, encoder: Wav2Vec2AudioFeatures, *, chunk_frames: int = 12, lookahead_frames: int = 4,
                 context_s: float = 8.0, fps: int = FPS, alignment: str = "nominal") -> None:
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment {alignment!r}: expected one of {ALIGNMENTS}")
        if SAMPLE_RATE % fps:
            raise ValueError(f"fps {fps}: a video frame must be a whole number of 16 kHz samples")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be ≥ 1, got {chunk_frames}")
        if lookahead_frames < 1:
            # With none, the chunk's last frame maps past the window's last 30 Hz row and would be a zero vector.
            raise ValueError(f"lookahead_frames must be ≥ 1 (got {lookahead_frames}): the last frame of a chunk "
                             "needs audio past its own end to get a 30 Hz row")
        self.encoder, self.alignment = encoder, alignment
        self.fps, self.chunk_frames, self.lookahead_frames = fps, chunk_frames, lookahead_frames
        self.frame_samples = SAMPLE_RATE // fps
        self.grid_samples = _grid_frames(fps) * self.frame_samples
        self.context_samples = max(1, round(context_s * SAMPLE_RATE))
        if self.context_samples < (chunk_frames + lookahead_frames) * self.frame_samples:
            raise ValueError(f"context_s {context_s}: the window must hold at least one chunk plus its look-ahead "
                             f"({(chunk_frames + lookahead_frames) / fps:.3f} s)")
        self.reset()

    @property
    def lookahead_ms(self) -> float:
        return 1000.0 * self.lookahead_frames / self.fps

    @property
    def buffered_samples(self) -> int:
        return int(self._buf.shape[0])

    @property
    def samples_received(self) -> int:
        return self._total

    def reset(self) -> None:
        """Start a new stream (frame 0 = the next sample pushed)."""
        self._buf = torch.zeros(0)
        self._buf_start = 0  # absolute sample index of _buf[0]
        self._total = 0
        self._next = 0  # next chunk index
        self._ended = False
        self._cache: tuple[tuple[int, int], Tensor] | None = None

    def _window_start(self, end: int) -> int:
        start = max(0, end - self.context_samples)
        return start // self.grid_samples * self.grid_samples

    def _chunk_end(self, k: int) -> int:
        """Absolute sample up to which chunk k needs audio."""
        return ((k + 1) * self.chunk_frames + self.lookahead_frames) * self.frame_samples

    def _compute(self, k: int, end: int, num_frames: int) -> FeatureChunk:
        start = self._window_start(end)
        key = (start, end)
        if self._cache is None or self._cache[0] != key:
            window = self._buf[start - self._buf_start: end - self._buf_start]
            self._cache = (key, to_video_rate(self.encoder.hidden_states(window), self.alignment))
        first = k * self.chunk_frames
        feats = align_to_video(self._cache[1], num_frames, self.fps, start=first - start // self.frame_samples)
        return FeatureChunk(k, first, feats)

    def _trim(self) -> None:
        keep = self._window_start(self._chunk_end(self._next - 1)) if self._next else 0
        if keep > self._buf_start:
            self._buf = self._buf[keep - self._buf_start:].clone()
            self._buf_start = keep

    def push(self, samples, sample_rate: int = SAMPLE_RATE) -> list[FeatureChunk]:
        """Append 16 kHz mono samples; returns the chunks that became complete (possibly none)."""
        if self._ended:
            raise RuntimeError("push() after flush(): call reset() to start a new stream")
        x = check_audio(samples, sample_rate)
        ready: list[FeatureChunk] = []
        step = self.chunk_frames * self.frame_samples
        for i in range(0, x.shape[0], step):  # bounded buffer even for one huge push
            piece = x[i:i + step]
            self._buf = torch.cat([self._buf, piece])
            self._total += piece.shape[0]
            while self._total >= self._chunk_end(self._next):
                ready.append(self._compute(self._next, self._chunk_end(self._next), self.chunk_frames))
                self._next += 1
                self._trim()
        return ready

    def flush(self) -> list[FeatureChunk]:
        """End of stream: the remaining frames, up to the whole-file count for the audio received, computed
        with the audio there is (no look-ahead left)."""
        if self._ended:
            return []
        self._ended = True
        total_frames = frames_with_audio(video_rate_frames(wav2vec_frames(self._total)), self.fps)
        out: list[FeatureChunk] = []
        while self._next * self.chunk_frames < total_frames:
            n = min(self.chunk_frames, total_frames - self._next * self.chunk_frames)
            out.append(self._compute(self._next, self._total, n))
            self._next += 1
        self._buf = torch.zeros(0)
        self._cache = None
        return out
