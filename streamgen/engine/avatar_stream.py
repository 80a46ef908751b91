"""`AvatarStream`: LiveAvatar's causal S2V DiT as a live, audio-driven stream (spec/avatar.md §2.4–2.9, §4.3).

Audio goes in as it arrives (`push_audio`: wav2vec2 features `[frames, layers, audio_dim]`, one vector per 25 fps
video frame, or 16 kHz samples through a `StreamingAudioFeatures` encoder); `next_chunk()` generates the next block
of `chunk_frames` latent frames (= 4·chunk_frames video frames, 12 = 480 ms for LiveAvatar) from the audio queued for
it, with the reference's block loop (`sampling.s2v_blocks.S2VBlockSampler`: one noisy-key ring per denoising step,
the cond/sink cache prefilled from the reference and motion latents, 4 Euler steps, the rolling-sink offset drawn
per call). It never waits longer than asked (`wait_s`, default 0).

Audio clock. The stream consumes the input in order and every input feature frame drives exactly one generated
video frame; the chunk's `AudioSpan` says which (`frames`, `samples`: ranges of the input that tile it with no gap
or overlap). A block takes the next `4·chunk_frames` queued frames. When fewer are queued it does not wait for them:
it is generated from silence (zero features, the reference's padding of frames past the audio; `silence=` can
supply e.g. real wav2vec2 features of silence) and consumes nothing, so the audio that arrives later is spoken by a
later chunk, in sync, instead of being skipped (`AudioSpan.silent`). `end_audio()` ends a segment: its last partial
block is then used, padded with silence at its end (`AudioSpan.tail`). So the output timeline is the input timeline
with silent (idle) frames inserted where the audio ran dry; a server plays each chunk's frames with its span's
samples followed by `tail` frames of silence.

A/V offset (spec §2.9, pitfall 9). The reference drops the first 3 decoded frames — a causal VAE decodes the first
latent to 1 frame instead of 4; streamgen's `WanVAEFrames` / `TAEHVFrames` do the same (decoded frame d = generated
frame d + 3) — and then muxes the audio from sample 0, so every shown frame was driven by the audio 3 frames
(120 ms) after the one it plays with: the video runs 120 ms early. Here the first chunk starts with
`lead_in_frames` (default 3 = the frames such a decoder does not show) frames of silence, and the input audio starts
at generated frame 3, the first frame that is shown: decoded frame d is driven by input feature frame d and plays
with input samples [d·640, (d + 1)·640) at 16 kHz / 25 fps. No audio is dropped and the server trims nothing.
`lead_in_frames=0` keeps the reference's indexing (the golden fixture needs it); a server must then drop the first
3·640 input samples itself. `AudioSpan.input_frame(j)` gives the input frame that drove the chunk's generated frame
j (None: silence), whatever the setting.

Determinism. Noise is `NoiseSource(seed).initial(block)` and the rolling-sink offset rd ∈ rd_range of block g,
step i is a uniform integer derived from the same seed's keyed draw (g, i, "rd") — the reference's unseeded
`random.randint(4, 30)`, made reproducible; both can be injected (`noise=`, `sink_draws=`, e.g.
`RecordedSinkDraws` with the fixture's `rope_rd_draws`) to replay a reference run bit for bit.

Not here: batching with other streams in the engine loop (`next_chunk` runs alone), decoding (see
`models/decoders.py`), the motion-latent refresh of `--enable_online_decode`, pose conditioning (zeros, as the
reference runs it).
"""
from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..models.s2v import S2VDiT
from ..models.s2v.wav2vec import SAMPLE_RATE, FeatureChunk, StreamingAudioFeatures, as_audio_emb
from ..sampling.s2v_blocks import EulerSchedule, S2VBlockSampler, cond_token_count
from .noise import NoiseSource

SinkDraws = Callable[[int, int], int]  # (block, step) -> rd


@dataclass(frozen=True)
class AvatarStreamConfig:
    """LiveAvatar's stream settings (defaults: the reference's, spec §2.1, §2.7; `live-avatar.yaml: stream`)."""

    chunk_frames: int = 3  # latent frames per block (num_frames_per_block)
    steps: int = 4  # Euler steps per block (FlowMatchEuler set_timesteps)
    shift: float = 3.0
    ring_frames: int = 12  # latent frames per step ring (policy_settings.capacity_frames)
    cond_tokens: int | None = None  # cond cache capacity; None: exactly the reference + motion tokens
    rd_range: tuple[int, int] = (4, 30)  # rolling-sink draw, inclusive
    fps: int = 25
    sample_rate: int = SAMPLE_RATE
    frames_per_latent: int = 4  # the VAE's temporal stride: video frames per latent frame
    lead_in_frames: int = 3  # silence frames before the input audio (the frames a causal VAE does not show)
    sink_swap_block: int | None = None  # TPP: at this block the reference becomes frame 0 of block 0 (4 = clip 1)
    max_queued_frames: int = 1500  # audio buffered ahead of generation (60 s at 25 fps); more is refused

    def __post_init__(self) -> None:
        object.__setattr__(self, "rd_range", tuple(int(r) for r in self.rd_range))
        lo, hi = self.rd_range
        problems = []
        if self.chunk_frames < 1 or self.steps < 1:
            problems.append(f"chunk_frames {self.chunk_frames} and steps {self.steps} must be ≥ 1")
        if self.ring_frames < self.chunk_frames or self.ring_frames % self.chunk_frames:
            problems.append(f"ring_frames {self.ring_frames} must be a positive multiple of chunk_frames "
                            f"{self.chunk_frames} (a block never straddles the ring's end)")
        if not 0 <= lo <= hi:
            problems.append(f"rd_range must be (lo, hi) with 0 ≤ lo ≤ hi, got {self.rd_range}")
        if self.fps < 1 or self.sample_rate % self.fps:
            problems.append(f"fps {self.fps}: a video frame must be a whole number of samples at {self.sample_rate} Hz")
        if not 0 <= self.lead_in_frames < self.video_frames_per_chunk:
            problems.append(f"lead_in_frames {self.lead_in_frames} must lie in [0, {self.video_frames_per_chunk})")
        if self.sink_swap_block is not None and self.sink_swap_block < 1:
            problems.append(f"sink_swap_block {self.sink_swap_block} must be ≥ 1 (block 0 makes the new reference)")
        if self.max_queued_frames < self.video_frames_per_chunk:
            problems.append(f"max_queued_frames {self.max_queued_frames} must hold one block "
                            f"({self.video_frames_per_chunk} frames)")
        if problems:
            raise ValueError("AvatarStreamConfig: " + "; ".join(problems))

    @property
    def video_frames_per_chunk(self) -> int:
        return self.chunk_frames * self.frames_per_latent

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps


@dataclass(frozen=True)
class AudioSpan:
    """The audio one chunk was driven by: its generated video frames are `lead` silence frames, then the input
    feature frames `frames` (input samples `samples`), then `tail` silence frames."""

    frames: range
    samples: range
    lead: int
    tail: int

    @property
    def silent(self) -> bool:
        """No input audio had arrived for this chunk: generated from silence features alone."""
        return len(self.frames) == 0

    def input_frame(self, j: int) -> int | None:
        """The input feature frame that drove the chunk's generated video frame j (None: silence)."""
        i = j - self.lead
        return self.frames.start + i if 0 <= i < len(self.frames) else None


@dataclass
class AvatarChunk:
    """One generated block: clean latents [B, F, C, H, W] (the `Stream.Chunk` / decoder layout) of latent frames
    `first_frame ..`, i.e. generated video frames `video_frames` (25 fps grid), and the audio that drove them."""

    index: int
    first_frame: int
    latents: Tensor
    video_frames: range
    audio: AudioSpan

    @property
    def silent(self) -> bool:
        return self.audio.silent


class SeededSinkDraws:
    """The rolling-sink offset rd of (block, step): uniform in [lo, hi], from the stream seed's keyed normal draw
    (block, step, "rd") through the normal CDF — deterministic and independent of call order."""

    def __init__(self, seed: int, rd_range: tuple[int, int]) -> None:
        self.source = NoiseSource(seed, ())
        self.lo, self.count = rd_range[0], rd_range[1] - rd_range[0] + 1

    def __call__(self, block: int, step: int) -> int:
        z = float(self.source.draw(block, step, "rd"))
        u = 0.5 * math.erfc(-z / math.sqrt(2.0))
        return self.lo + min(int(u * self.count), self.count - 1)


def _as_tensor(x, what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


class AvatarStream:
    """A live LiveAvatar generation: `push_audio` from any thread, `next_chunk()` → `AvatarChunk`."""

    def __init__(self, model: S2VDiT, context: Tensor, reference: Tensor, motion: Tensor, *, seed: int = 0,
                 config: AvatarStreamConfig | None = None, silence: Tensor | None = None,
                 audio_encoder: StreamingAudioFeatures | None = None, noise=None,
                 sink_draws: SinkDraws | None = None) -> None:
        """`context`: the encoded prompt [rows, text_dim] (or [1, rows, text_dim]), zero-padded to text_len;
        `reference`: the reference image's latent [1, C, 1, H, W] (or [C, 1, H, W], [C, H, W]); `motion`: the
        FramePack motion latents [1, C, T, H, W] (the reference repeated `motion_frames` video frames, encoded;
        see `from_image`); `audio_encoder`: needed for `push_samples`; `noise` (an object with
        `initial(block) -> [1, C, F, H, W]`) and `sink_draws` replace the seeded draws (fixture replay)."""
        self.model, self.config = model, config or AvatarStreamConfig()
        cfg, m = self.config, model.cfg
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.reference = self._check_reference(reference)
        _, _, _, self.latent_height, self.latent_width = self.reference.shape
        self.motion = self._check_motion(motion)
        ctx = self._check_context(context)
        self.silence = self._check_silence(silence)
        if audio_encoder is not None and audio_encoder.fps != cfg.fps:
            raise ValueError(f"audio_encoder runs at {audio_encoder.fps} fps, the stream at {cfg.fps} fps")
        if audio_encoder is not None and cfg.sample_rate != SAMPLE_RATE:
            raise ValueError(f"audio_encoder takes {SAMPLE_RATE} Hz samples, the stream is set to {cfg.sample_rate} Hz")
        self.audio_encoder = audio_encoder
        self.seed = seed
        self.noise = noise if noise is not None else NoiseSource(seed, self.noise_shape, self.dtype, self.device)
        self.sink_draws = sink_draws if sink_draws is not None else SeededSinkDraws(seed, cfg.rd_range)
        need = cond_token_count(m, self.latent_height, self.latent_width)
        cond_tokens = need if cfg.cond_tokens is None else cfg.cond_tokens
        if cond_tokens < need:
            raise ValueError(f"cond_tokens {cond_tokens} cannot hold the {need} cond tokens (reference + FramePack "
                             f"motion) of a {self.latent_height}x{self.latent_width} latent")
        tokens_per_frame = (self.latent_height // m.patch_size[1]) * (self.latent_width // m.patch_size[2])
        self.schedule = EulerSchedule.flow_match(cfg.steps, cfg.shift)
        self.sampler = S2VBlockSampler(model, self.schedule, ring_tokens=cfg.ring_frames * tokens_per_frame,
                                       cond_tokens=cond_tokens, chunk_frames=cfg.chunk_frames)
        with torch.no_grad():
            self.cross = model.cross_kv(model.context(ctx))
            self.sampler.prefill(self.reference, self.motion, self.cross)
        self.pose = torch.zeros(1, m.cond_dim, cfg.chunk_frames, self.latent_height, self.latent_width,
                                dtype=self.dtype, device=self.device)  # pose disabled: only cond_encoder's bias
        self._first_frame: Tensor | None = None  # frame 0 of block 0: the sink reference after a swap
        self.chunks = 0  # blocks generated
        # audio input: queued feature frames (each with the input sample its span ends at) and the clocks
        self._lock = threading.Condition()
        self._generating = threading.Lock()
        self._queue: deque[Tensor] = deque()
        self._ends: deque[int] = deque()
        self._received = 0  # input feature frames pushed
        self._consumed = 0  # input feature frames used by chunks
        self._released = 0  # frames up to here belong to ended segments: a partial block may use them
        self._sample_clock = 0  # input sample where the next received frame starts
        self._consumed_sample = 0  # input sample where the next chunk's span starts
        self._segment_start = 0  # input sample of the open encoder segment's first sample
        self._segment_frames = 0  # frames the open encoder segment has produced

    @classmethod
    def from_image(cls, model: S2VDiT, context: Tensor, image: Tensor, encode: Callable[[Tensor], Tensor], *,
                   ref_frames: int = 5, ref_index: int = 1, **kwargs) -> AvatarStream:
        """Reference and motion latents from an image [3, H, W] in [-1, 1] and a VAE-like
        `encode(video [1, 3, T, H, W]) -> [1, C, T', H/8, W/8]`, as the reference pipelines do: the reference
        latent is latent `ref_index` of the image repeated `ref_frames` frames (single GPU: 5 and 1; the TPP
        pipeline encodes the single frame: 1 and 0), the motion latents encode it repeated `motion_frames` times."""
        image = _as_tensor(image, "image")
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image of shape {tuple(image.shape)}: expected [3, H, W] RGB in [-1, 1]")
        if not 0 <= ref_index < ref_frames:
            raise ValueError(f"ref_index {ref_index} outside the {ref_frames} encoded reference frames")
        video = image[None, :, None]
        with torch.no_grad():
            ref = encode(video.expand(1, 3, ref_frames, *image.shape[1:]))
            motion = encode(video.expand(1, 3, model.cfg.motion_frames, *image.shape[1:]))
        if not isinstance(ref, Tensor) or ref.ndim != 5 or ref.shape[2] <= ref_index:
            raise ValueError(f"encode gave {getattr(ref, 'shape', type(ref).__name__)} for {ref_frames} frames: "
                             f"expected latents [1, C, T', h, w] with T' > ref_index {ref_index}")
        return cls(model, context, ref[:, :, ref_index:ref_index + 1], motion, **kwargs)

    # --- input checks ----------------------------------------------------------------------------
    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (1, self.model.cfg.in_dim, self.config.chunk_frames, self.latent_height, self.latent_width)

    def _check_reference(self, reference) -> Tensor:
        x = _as_tensor(reference, "reference latents")
        c = self.model.cfg.in_dim
        original = tuple(x.shape)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim == 4:
            x = x[None]
        expected = (f"expected the reference image's latent [1, {c}, 1, H, W] (or [{c}, 1, H, W], [{c}, H, W]) with "
                    f"H and W even and ≥ 8 (FramePack packs 8×8 latent patches)")
        if x.ndim != 5 or x.shape[0] != 1 or x.shape[1] != c or x.shape[2] != 1:
            raise ValueError(f"reference latents of shape {original}: {expected}")
        h, w = x.shape[3:]
        if h % 2 or w % 2 or h < 8 or w < 8:
            raise ValueError(f"reference latents of shape {original}: {expected}")
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError(f"reference latents must be finite floats, got dtype {x.dtype}")
        return x.to(self.device, self.dtype)

    def _check_motion(self, motion) -> Tensor:
        x = _as_tensor(motion, "motion latents")
        c, (h, w) = self.model.cfg.in_dim, (self.latent_height, self.latent_width)
        original = tuple(x.shape)
        if x.ndim == 4:
            x = x[None]
        if x.ndim != 5 or x.shape[0] != 1 or x.shape[1] != c or x.shape[2] < 1 or tuple(x.shape[3:]) != (h, w):
            raise ValueError(f"motion latents of shape {original}: expected [1, {c}, T, {h}, {w}] (T ≥ 1; the "
                             f"reference repeated {self.model.cfg.motion_frames} video frames and encoded gives "
                             f"T = {self.model.cfg.motion_latent_frames}), matching the reference latent's size")
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError(f"motion latents must be finite floats, got dtype {x.dtype}")
        return x.to(self.device, self.dtype)

    def _check_context(self, context) -> Tensor:
        x = _as_tensor(context, "context")
        m = self.model.cfg
        original = tuple(x.shape)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != m.text_dim or not 1 <= x.shape[1] <= m.text_len:
            raise ValueError(f"context of shape {original}: expected the encoded prompt [rows, {m.text_dim}] (or "
                             f"[1, rows, {m.text_dim}]) with 1 ≤ rows ≤ text_len {m.text_len}")
        return x.to(self.device)

    def _check_silence(self, silence) -> Tensor:
        m = self.model.cfg
        if silence is None:
            return torch.zeros(m.audio_layers, m.audio_dim)
        x = _as_tensor(silence, "silence features").to(torch.float32)
        if tuple(x.shape) != (m.audio_layers, m.audio_dim):
            raise ValueError(f"silence features of shape {tuple(x.shape)}: expected one frame [{m.audio_layers}, "
                             f"{m.audio_dim}] (audio_layers, audio_dim)")
        return x

    def _check_features(self, features) -> Tensor:
        x = _as_tensor(features, "audio features")
        m = self.model.cfg
        if x.ndim != 3 or tuple(x.shape[1:]) != (m.audio_layers, m.audio_dim):
            raise ValueError(f"audio features of shape {tuple(x.shape)}: expected [frames, {m.audio_layers}, "
                             f"{m.audio_dim}] (one vector per {self.config.fps} fps video frame, wav2vec2 hidden "
                             f"states = audio_layers, audio_dim), as Wav2Vec2AudioFeatures / StreamingAudioFeatures give")
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError(f"audio features must be finite floats, got dtype {x.dtype}")
        return x.to(torch.float32)

    # --- audio input -----------------------------------------------------------------------------
    def push_audio(self, audio, sample_rate: int = SAMPLE_RATE) -> int:
        """Features `[frames, layers, audio_dim]` (or a `FeatureChunk`), or mono samples `[N]` (through the
        audio encoder). Returns the frames now queued."""
        if isinstance(audio, FeatureChunk):
            return self.push_features(audio.features)
        x = _as_tensor(audio, "audio")
        if x.ndim == 3:
            return self.push_features(x)
        if x.ndim == 1 or (x.ndim == 2 and x.shape[0] == 1):
            return self.push_samples(x, sample_rate)
        m = self.model.cfg
        raise ValueError(f"audio of shape {tuple(x.shape)}: expected features [frames, {m.audio_layers}, "
                         f"{m.audio_dim}] or mono samples [N]")

    def push_features(self, features) -> int:
        """Queue feature frames; each spans `samples_per_frame` input samples."""
        x = self._check_features(features)
        if self.audio_encoder is not None and self.audio_encoder.samples_received:
            raise RuntimeError("push_features while an audio-encoder segment is open: call end_audio() first")
        spf = self.config.samples_per_frame
        with self._lock:
            start = self._sample_clock
            self._enqueue(x, [start + spf * (j + 1) for j in range(x.shape[0])])
            return len(self._queue)

    def push_samples(self, samples, sample_rate: int = SAMPLE_RATE) -> int:
        """Feed mono samples to the audio encoder; the feature frames it completes are queued (frame j of a
        segment spans its samples [j·spf, (j + 1)·spf), the last one ends with the segment). One producer
        thread calls push_samples / end_audio (the encoder is not shared-safe); next_chunk may run in another."""
        if self.audio_encoder is None:
            raise RuntimeError("push_samples needs an audio_encoder (StreamingAudioFeatures); or push features")
        ready = self.audio_encoder.push(samples, sample_rate)
        with self._lock:
            self._enqueue_segment(ready)
            return len(self._queue)

    def end_audio(self) -> int:
        """End of a segment (an utterance): an open encoder segment is flushed (frames past its audio get zero
        features, as the reference pads, up to a whole frame count of its samples) and the queued frames may
        now fill a partial block, padded with silence. Later pushes start a new segment. Returns frames queued."""
        with self._lock:
            enc = self.audio_encoder
            if enc is not None and enc.samples_received:
                total = enc.samples_received
                self._enqueue_segment(enc.flush())
                spf = self.config.samples_per_frame
                frames = -(-total // spf)
                pad = frames - self._segment_frames
                if pad > 0:
                    m = self.model.cfg
                    ends = [self._segment_start + min(spf * (j + 1), total) for j in range(self._segment_frames, frames)]
                    self._enqueue(torch.zeros(pad, m.audio_layers, m.audio_dim), ends)
                elif self._ends:
                    self._ends[-1] = self._segment_start + total  # the last frame ends with the audio
                self._sample_clock = self._segment_start + total
                self._segment_start, self._segment_frames = self._sample_clock, 0
                enc.reset()
            self._released = self._received
            self._lock.notify_all()
            return len(self._queue)

    def _enqueue_segment(self, chunks: list[FeatureChunk]) -> None:
        spf = self.config.samples_per_frame
        for chunk in chunks:
            if chunk.start_frame != self._segment_frames:
                raise RuntimeError(f"audio encoder chunk starts at frame {chunk.start_frame}, expected "
                                   f"{self._segment_frames}")
            x = self._check_features(chunk.features)
            first = self._segment_frames
            self._enqueue(x, [self._segment_start + spf * (first + j + 1) for j in range(x.shape[0])])
            self._segment_frames += x.shape[0]

    def _enqueue(self, x: Tensor, ends: list[int]) -> None:
        if len(self._queue) + x.shape[0] > self.config.max_queued_frames:
            raise BufferError(f"audio queue full: {len(self._queue)} frames queued + {x.shape[0]} pushed > "
                              f"max_queued_frames {self.config.max_queued_frames}; push at most as fast as "
                              "next_chunk consumes (or raise the limit)")
        self._queue.extend(x.unbind(0))
        self._ends.extend(ends)
        self._received += x.shape[0]
        if ends:
            self._sample_clock = ends[-1]
        self._lock.notify_all()

    @property
    def queued_frames(self) -> int:
        """Input feature frames received and not yet used."""
        with self._lock:
            return len(self._queue)

    @property
    def received_frames(self) -> int:
        return self._received

    @property
    def frame(self) -> int:
        """Latent frames generated so far."""
        return self.chunks * self.config.chunk_frames

    # --- generation ------------------------------------------------------------------------------
    def _take(self, need: int, wait_s: float) -> tuple[list[Tensor], range, range]:
        """The input frames of the next block: `need` of them, or the released tail of an ended segment, or none."""
        with self._lock:
            def ready() -> bool:
                return len(self._queue) >= need or self._released > self._consumed

            if wait_s > 0 and not ready():
                self._lock.wait_for(ready, timeout=wait_s)
            if len(self._queue) >= need:
                n = need
            else:
                n = min(len(self._queue), max(0, self._released - self._consumed))
            frames = [self._queue.popleft() for _ in range(n)]
            start = self._consumed_sample
            end = start
            for _ in range(n):
                end = self._ends.popleft()
            span = range(self._consumed, self._consumed + n)
            self._consumed += n
            self._consumed_sample = end
            return frames, span, range(start, end)

    def _check_rope(self, block: int) -> None:
        m, cfg = self.model.cfg, self.config
        f = cfg.chunk_frames * block
        top = max(f + cfg.chunk_frames, m.ref_rope_frame + 1, f + cfg.rd_range[1] + 1)
        if top > m.rope_max_frames:
            raise RuntimeError(f"block {block} (latent frame {f}) needs RoPE rows up to {top}, the table has "
                               f"{m.rope_max_frames} (the reference's limit, spec §2.6): start a new stream")

    @torch.no_grad()
    def next_chunk(self, wait_s: float = 0.0) -> AvatarChunk:
        """Generate the next block from the audio queued for it; waits at most `wait_s` seconds for that audio
        (0: not at all), then uses silence."""
        with self._generating:
            cfg = self.config
            g = self.chunks
            self._check_rope(g)
            lead = cfg.lead_in_frames if g == 0 else 0
            frames, span, samples = self._take(cfg.video_frames_per_chunk - lead, wait_s)
            tail = cfg.video_frames_per_chunk - lead - len(frames)
            feats = torch.stack([self.silence] * lead + frames + [self.silence] * tail)
            audio = self.model.casual_audio_encoder(as_audio_emb(feats).to(self.device, self.dtype))
            if cfg.sink_swap_block is not None and g == cfg.sink_swap_block:
                self.sampler.prefill(self._first_frame, self.motion, self.cross)
            draws = [int(self.sink_draws(g, i)) for i in range(self.schedule.steps)]
            lo, hi = cfg.rd_range
            if any(not lo <= d <= hi for d in draws):
                raise ValueError(f"block {g}: sink draws {draws} outside rd_range {cfg.rd_range}")
            x = self.noise.initial(g)
            if tuple(x.shape) != self.noise_shape:
                raise ValueError(f"noise for block {g} has shape {tuple(x.shape)}, expected {self.noise_shape}")
            x = self.sampler.block(x.to(self.device, self.dtype), g, self.pose, audio, self.cross, draws)
            if g == 0:
                self._first_frame = x[:, :, :1].clone()
            self.chunks += 1
            first = cfg.chunk_frames * g
            video = range(first * cfg.frames_per_latent, (first + cfg.chunk_frames) * cfg.frames_per_latent)
            return AvatarChunk(g, first, x.transpose(1, 2).contiguous(), video, AudioSpan(span, samples, lead, tail))

    @property
    def cache_bytes(self) -> int:
        return self.sampler.cache_bytes

