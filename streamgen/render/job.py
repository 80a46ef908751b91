"""The render job loop, apart from the CLI so a queue (or a server) can drive it:
`run_job(RenderJob(...), backend, progress=cb) -> RenderResult`.

Timing: `at` seconds and `seconds` are model time — video frame i is at i / model fps. A timeline
entry at `at` s is the first video frame v with v / fps ≥ at, then the first latent frame whose first
video frame is ≥ v (the decoder's `video_frame` mapping: 1:1 for pixel / preview decoders, 1 + 4·(l−1)
for the Wan VAE), and `FrameStream.set_prompt(..., at_frame=latent)` is queued before the first chunk:
the change lands on the first chunk that starts at or after it, whatever the schedule or backend.
The render writes exactly round(seconds × model fps) frames (the last chunk is trimmed, and so are the
saved latents: the latent frames of the video frames written); `fps` only sets the container's frame rate.

Audio-driven models (`bundle.avatar`, e.g. embedded-avatar): the job's `drive` (a WAV's samples and a
reference picture) replaces the timeline; the audio sets the length, ceil(samples / samples per frame)
frames, and the MP4 gets an AAC track of exactly the samples that drove the frames written (the last
frame's missing samples are the silence it was driven by), so frame n plays beside its own audio.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.driven import AudioBuffer, AudioDriven, use_drive
from ..engine.prompts import describe_prompt
from ..images import DEFAULT_REFERENCE
from .timeline import TimelineEntry, TimelineError, single_prompt, timeline_json
from .writer import (
    DEFAULT_CRF,
    DEFAULT_PRESET,
    Output,
    VideoWriter,
    check_writable,
    parse_output,
    save_latents,
)

LATENTS_FORMAT = "streamgen-render-latents-v1"

Progress = Callable[[int, int], None]  # (frames done, frames total)


@dataclass(frozen=True)
class Drive:
    """What drives an audio-driven render, read before any model is loaded (a bad file fails fast):
    mono float32 samples [N] at `rate` Hz and the reference picture uint8 [H, W, 3]."""

    samples: np.ndarray
    rate: int
    picture: np.ndarray
    audio: str  # where they came from: messages and the latents' metadata
    reference: str | None  # None: DEFAULT_REFERENCE

    def frames(self, model: AudioDriven) -> int:
        """Video frames this audio drives: a partial last frame counts (its rest is silence)."""
        return -(-len(self.samples) // model.samples_per_frame)


def read_drive(audio: str | Path, reference: str | Path | None = None) -> Drive:
    """--audio (integer-PCM WAV, channels averaged, resampled to 16 kHz) and --reference (PNG / JPEG, or
    `default_reference`) → a Drive; ValueError naming the flag for a file that cannot be read."""
    from ..audio import SAMPLE_RATE, load_audio
    from ..images import default_reference, read_image

    try:
        samples = load_audio(audio).numpy()
    except (OSError, EOFError, ValueError) as exc:  # missing, truncated, not PCM WAV
        raise ValueError(f"--audio: {exc}") from None
    if not len(samples):
        raise ValueError(f"--audio: {audio} holds no samples")
    try:
        picture = default_reference() if reference is None else read_image(reference)
    except ValueError as exc:
        raise ValueError(f"--reference: {exc}") from None
    return Drive(samples, SAMPLE_RATE, picture, str(audio), None if reference is None else str(reference))


@dataclass
class RenderJob:
    """One render: the timeline (first entry at 0 = the opening prompt), its length, its outputs and
    the stream settings it overrides (None = the model's)."""

    timeline: list[TimelineEntry]  # empty: none given (an audio-driven model needs none)
    seconds: float | None  # None: the audio's length (audio-driven models only)
    out: Path | str | Output | None = None  # MP4 / HLS file or RTMP URL (`parse_output`); at least one of out / latents_out
    latents_out: Path | None = None  # safetensors: "latents" [1, F, C, h, w] of the frames written + metadata
    seed: int | None = None
    fps: float | None = None  # container frame rate (default: the model's)
    size: int | tuple[int, int] | None = None  # longer side, or (W, H); None: the model's frame size
    scale_filter: str = "auto"
    crf: int | None = DEFAULT_CRF
    bitrate: int | None = None  # bits/s; set: average bitrate instead of CRF
    preset: str = DEFAULT_PRESET
    schedule: str | None = None  # exact | timestep-slot
    policy: str | None = None
    policy_settings: dict[str, Any] = field(default_factory=dict)
    batch_slots: bool | None = None  # timestep-slot: False runs slots one by one (same latents)
    source: str = "<timeline>"  # the timeline's file, for messages
    drive: Drive | None = None  # audio + reference: what an audio-driven model renders from

    def overrides(self, model_config) -> dict[str, Any]:
        """`Backend.open` overrides of the model's StreamConfig `model_config`."""
        out: dict[str, Any] = {}
        if self.seed is not None:
            out["seed"] = int(self.seed)
        if self.schedule is not None:
            out["schedule"] = self.schedule
        if self.batch_slots is not None:
            out["batch_slots"] = bool(self.batch_slots)
        if self.policy is not None and self.policy != model_config.policy:
            out["policy"] = self.policy
            out["policy_settings"] = dict(self.policy_settings)  # the model's settings belong to its policy
        elif self.policy_settings:
            out["policy_settings"] = {**model_config.policy_settings, **self.policy_settings}
        return out


@dataclass
class Switch:
    """Where a timeline entry lands: requested video frame → latent frame → planned chunk; `landed`
    is the video frame the stream acknowledged (None until it did)."""

    entry: TimelineEntry
    video_frame: int
    latent_frame: int
    chunk: int
    landed: int | None = None


@dataclass
class RenderResult:
    frames: int
    seconds: float  # video length at the container rate
    model_fps: float
    fps: float  # container rate
    wall_s: float
    chunks: int
    out: Path | str | None  # a file, or the RTMP URL
    latents_out: Path | None
    latent_shape: tuple[int, ...] | None
    size: tuple[int, int] | None
    filter: str | None
    switches: list[Switch]
    warnings: list[str]
    config: dict[str, Any]
    stalls: int = 0
    audio_rate: int | None = None  # the MP4's AAC track (Hz), for audio-driven renders

    @property
    def frames_per_s(self) -> float:
        """Generation speed: frames rendered (generated, decoded, encoded) per wall-clock second."""
        return self.frames / self.wall_s if self.wall_s > 0 else float("inf")

    def summary(self) -> str:
        where = [str(p) for p in (self.out, self.latents_out) if p is not None]
        video = f", {self.size[0]}x{self.size[1]} h264" if self.size else ""
        video += f" + {self.audio_rate} Hz aac" if self.size and self.audio_rate else ""
        return (f"rendered {self.frames} frames ({self.seconds:.2f} s at {self.fps:g} fps{video}) in {self.wall_s:.2f} s: "
                f"{self.frames_per_s:.1f} frames/s ({self.frames_per_s / self.model_fps:.2f}× real time) → {', '.join(where)}")


def frame_count(seconds: float, fps: float) -> int:
    return round(seconds * fps)


def job_frames(job: RenderJob, bundle) -> int:
    """The frames `job` writes on `bundle`, after checking that its inputs are the ones this model takes
    (ValueError saying what to give instead); cheap, so the CLI calls it before its progress bar."""
    return _text_frames(job, bundle) if bundle.avatar is None else _driven_frames(job, bundle)


def _text_frames(job: RenderJob, bundle) -> int:
    """A text model: prompts and round(seconds × fps) frames; audio is refused, not dropped silently."""
    if job.drive is not None:
        flags = "--audio and --reference drive" if job.drive.reference else "--audio drives"
        raise ValueError(f"{flags} an audio-driven model (embedded-avatar); {bundle.name} is a text model: "
                         "drop them and give --prompt or --timeline")
    if not job.timeline:
        raise ValueError("nothing to render: give --prompt or --timeline")
    if job.seconds is None or not job.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {job.seconds}")
    total = frame_count(job.seconds, bundle.fps)
    if total < 1:
        raise ValueError(f"{job.seconds:g} s at {bundle.fps:g} fps is less than one frame")
    return total


def _driven_frames(job: RenderJob, bundle) -> int:
    """An audio-driven model: the audio to the frame, played at the model's rate (another --fps would
    make the video run faster or slower than its own sound track)."""
    model = bundle.avatar
    if job.drive is None:
        raise ValueError(f"{bundle.name} is audio-driven: give --audio SPEECH.wav (integer-PCM WAV) and, for "
                         f"its face, --reference PICTURE.png (default: {DEFAULT_REFERENCE})")
    if job.drive.rate != model.sample_rate:
        raise ValueError(f"{bundle.name} takes audio at {model.sample_rate} Hz, the job's is at {job.drive.rate} Hz")
    model.reference_latent(job.drive.picture)  # a picture the model cannot read (all black) is refused now
    if job.fps is not None and job.fps != bundle.fps:
        raise ValueError(f"--fps {job.fps:g} would play the video at another speed than its audio: an audio-driven "
                         f"render plays at the model's {bundle.fps:g} fps (drop --fps)")
    return job.drive.frames(model)


def require_backend(job: RenderJob, backend: str | None) -> None:
    """A driven stream's execution is set in process (`use_drive`): the Ray stages cannot run it yet."""
    if job.drive is not None and backend != "local":
        raise ValueError(f"an audio-driven model renders on the local backend only, not {backend!r}: drop --backend")


def drive_warnings(job: RenderJob, bundle, total: int) -> list[str]:
    """What a driven render ignores: text (the model has none) and --seconds (the audio sets the length)."""
    out = []
    if any(e.prompt for e in job.timeline):
        out.append(f"the prompt / timeline is ignored: {bundle.name} is driven by its audio and reference picture")
    if job.seconds is not None:
        out.append(f"--seconds is ignored: the audio sets the length ({total} frames, {total / bundle.fps:.2f} s)")
    return out


def attach_drive(stream, drive: Drive, model: AudioDriven) -> None:
    """Make a freshly opened local `FrameStream` audio-driven and hand it the whole file at once: a
    render is offline, so no chunk ever waits for audio (only the last is padded with silence)."""
    audio = AudioBuffer(drive.rate, None)
    use_drive(stream.stream, audio, model, drive.picture)
    audio.push(drive.samples)


def latent_for_video(video_frame: int, video: Callable[[int], int]) -> int:
    """The first latent frame whose first video frame is ≥ `video_frame` (mapping is increasing)."""
    lo, hi = 0, max(1, video_frame)
    while video(hi) < video_frame:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if video(mid) >= video_frame:
            hi = mid
        else:
            lo = mid + 1
    return lo


def plan_switches(timeline: list[TimelineEntry], fps: float, video: Callable[[int], int], chunk_frames: int,
                  total_frames: int, source: str = "<timeline>") -> tuple[list[Switch], list[str]]:
    """Map every entry to its latent frame and chunk; warnings for entries past the end and for
    entries that land on the same chunk as the one before (only the later one is seen there)."""
    if not timeline or timeline[0].at != 0:
        raise ValueError("a render timeline starts with its opening prompt at 0 s")
    switches: list[Switch] = []
    warnings: list[str] = []
    for e in timeline:
        v = math.ceil(e.at * fps - 1e-6)
        lat = latent_for_video(v, video)
        s = Switch(e, v, lat, -(-lat // chunk_frames))
        where = f"{source}:{e.line}: entry [{e.index}]" if e.line is not None else f"entry [{e.index}]"
        if v >= total_frames and e.at > 0:
            warnings.append(f"{where}: at {e.at:g} s is past the end of the render ({total_frames} frames): never shown")
        elif switches and s.chunk == switches[-1].chunk:
            warnings.append(f"{where}: lands on the same chunk ({s.chunk}) as the entry before: only its prompt is seen there")
        switches.append(s)
    return switches, warnings


def _entry_error(exc: Exception, e: TimelineEntry, source: str) -> TimelineError:
    if e.line is None and e.index is None:
        return TimelineError(str(exc), "--prompt")
    return TimelineError(f"prompt {e.prompt!r}: {exc}", source, e.line, e.index)


def run_job(job: RenderJob, backend, progress: Progress | None = None,
            warn: Callable[[str], None] | None = None) -> RenderResult:
    """Render `job` on `backend` (a `Backend` with `.bundle`: local or ray); `progress(done, total)`
    after every chunk, `warn(message)` for each planning warning before the first. Raises TimelineError
    (entry and line) for prompts or transitions the model refuses, ValueError for bad settings —
    both before anything is written; on any failure no output file is left behind."""
    bundle = backend.bundle
    if job.out is None and job.latents_out is None:
        raise ValueError("nothing to write: give an output file (-o) and/or --latents-out")
    total = job_frames(job, bundle)
    require_backend(job, getattr(backend, "name", None))
    fps_out = float(job.fps or bundle.fps)
    if not fps_out > 0:
        raise ValueError(f"--fps must be > 0, got {fps_out:g}")
    output = None if job.out is None else parse_output(job.out)
    for path in (output.path if output is not None and output.is_file else None, job.latents_out):
        if path is not None:
            check_writable(path)
    overrides = job.overrides(bundle.stream)
    config = replace(bundle.stream, **overrides)  # bad schedule / sampler combinations fail here
    if job.batch_slots is False and config.schedule != "timestep-slot":
        raise ValueError(f"--unbatched runs the timestep slots one by one, but this render's schedule is "
                         f"{config.schedule!r}: add --schedule timestep-slot, or drop --unbatched")
    video_frame = bundle.decoder().video_frame
    timeline = job.timeline if job.drive is None else single_prompt("")  # a driven model has no text
    switches, warnings = plan_switches(timeline, bundle.fps, video_frame, config.chunk_frames, total, job.source)
    if job.drive is not None:
        warnings += drive_warnings(job, bundle, total)
    for entry in job.timeline if job.drive is None else ():
        if (ignored := describe_prompt(bundle.text_encoder, entry.prompt).get("warning")) is not None:
            warnings.append(f"at {entry.at:g} s: {ignored}")
    for message in warnings if warn is not None else ():
        warn(message)
    opening = timeline[0]
    try:
        stream = backend.open(opening.prompt, overrides)
    except ValueError as exc:
        try:  # the prompt, or the settings?
            bundle.text_encoder.encode(opening.prompt)
        except ValueError:
            raise _entry_error(exc, opening, job.source) from None
        raise
    audio_rate = job.drive.rate if job.drive is not None else None
    writer = (VideoWriter(output, fps_out, job.size, job.scale_filter, job.crf, job.bitrate, job.preset, audio_rate)
              if output is not None else None)
    try:
        if job.drive is not None:
            attach_drive(stream, job.drive, bundle.avatar)
        for s in switches[1:]:
            try:
                stream.set_prompt(s.entry.prompt, s.entry.transition, at_frame=s.latent_frame)
            except ValueError as exc:
                raise _entry_error(exc, s.entry, job.source) from None
        config = getattr(stream.stream, "config", config)  # what the backend really runs (ray tpp: timestep-slot)
        pending = list(switches[1:])
        latents: list[torch.Tensor] = []
        done = chunks = stalls = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            while done < total:
                chunk = stream.next()
                chunks += 1
                stalls += 1 if chunk.stall else 0
                for ack in chunk.acks:
                    if ack.of == "prompt" and pending:
                        pending.pop(0).landed = ack.frame
                frames = chunk.frames[: total - done]
                if writer is not None and len(frames):
                    writer.write(frames, None if audio_rate is None else _frames_audio(chunk, len(frames), bundle))
                if job.latents_out is not None:
                    latents.append(chunk.latents.detach().cpu())
                done += len(frames)
                if progress is not None:
                    progress(done, total)
        wall = time.perf_counter() - t0
        meta_config = {"schedule": config.schedule, "policy": config.policy, "policy_settings": config.policy_settings,
                       "sampler": config.sampler, "steps": list(config.steps), "chunk_frames": config.chunk_frames,
                       "batch_slots": config.batch_slots,
                       "transition": {"kind": config.transition.kind, "chunks": config.transition.chunks,
                                      "interpolation": config.transition.interpolation}}
        if writer is not None:
            writer.close()
        latent_shape = None
        if job.latents_out is not None:
            # the last chunk runs past the end: keep only the latent frames of the video frames written
            all_latents = torch.cat(latents, dim=1)[:, : latent_for_video(total, video_frame)]
            latent_shape = tuple(all_latents.shape)
            try:
                save_latents(job.latents_out, all_latents, {
                    "format": LATENTS_FORMAT, "model": bundle.name, "seed": str(config.seed),
                    "timeline": timeline_json(timeline), "model_fps": repr(float(bundle.fps)), "fps": repr(fps_out),
                    "seconds": repr(float(job.seconds if job.drive is None else total / bundle.fps)), "frames": str(total),
                    **_drive_metadata(job.drive),
                    "backend": getattr(backend, "name", type(backend).__name__), **meta_config})
            except BaseException:
                if writer is not None and output.is_file:
                    writer.abort()  # all or nothing
                    output.path.unlink(missing_ok=True)
                raise
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        backend.close(stream)
    return RenderResult(frames=total, seconds=total / fps_out, model_fps=bundle.fps, fps=fps_out, wall_s=wall, chunks=chunks,
                        out=None if output is None else (output.path if output.is_file else output.target),
                        latents_out=job.latents_out, latent_shape=latent_shape,
                        size=writer.size if writer is not None else None, filter=writer.filter if writer else None,
                        switches=switches, warnings=warnings, config={"seed": config.seed, **meta_config}, stalls=stalls,
                        audio_rate=audio_rate if writer is not None else None)


def _frames_audio(chunk, frames: int, bundle) -> torch.Tensor:
    """The samples that drove a chunk's first `frames` frames (the last chunk's extra frames are cut)."""
    return chunk.audio[: frames * bundle.avatar.samples_per_frame]


def _drive_metadata(drive: Drive | None) -> dict[str, str]:
    """The latents file records what a driven render came from (a text render's timeline does that)."""
    if drive is None:
        return {}
    return {"audio": drive.audio, "audio_samples": str(len(drive.samples)), "sample_rate": str(drive.rate),
            "reference": drive.reference or DEFAULT_REFERENCE}
