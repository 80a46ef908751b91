"""The render job loop, apart from the CLI so a queue (or a server) can drive it:
`run_job(RenderJob(...), backend, progress=cb) -> RenderResult`.

Timing: `at` seconds and `seconds` are model time — video frame i is at i / model fps. A timeline
entry at `at` s is the first video frame v with v / fps ≥ at, then the first latent frame whose first
video frame is ≥ v (the decoder's `video_frame` mapping: 1:1 for pixel / preview decoders, 1 + 4·(l−1)
for the Wan VAE), and `FrameStream.set_prompt(..., at_frame=latent)` is queued before the first chunk:
the change lands on the first chunk that starts at or after it, whatever the schedule or backend.
The render writes exactly round(seconds × model fps) frames (the last chunk is trimmed, and so are the
saved latents: the latent frames of the video frames written); `fps` only sets the container's frame rate.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..engine.prompts import describe_prompt
from .timeline import TimelineEntry, TimelineError, timeline_json
from .writer import (
    DEFAULT_CRF,
    DEFAULT_PRESET,
    Mp4Writer,
    check_mp4_name,
    check_writable,
    save_latents,
)

LATENTS_FORMAT = "streamgen-render-latents-v1"

Progress = Callable[[int, int], None]  # (frames done, frames total)


@dataclass
class RenderJob:
    """One render: the timeline (first entry at 0 = the opening prompt), its length, its outputs and
    the stream settings it overrides (None = the model's)."""

    timeline: list[TimelineEntry]
    seconds: float
    out: Path | None = None  # MP4; at least one of out / latents_out
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
    out: Path | None
    latents_out: Path | None
    latent_shape: tuple[int, ...] | None
    size: tuple[int, int] | None
    filter: str | None
    switches: list[Switch]
    warnings: list[str]
    config: dict[str, Any]
    stalls: int = 0

    @property
    def frames_per_s(self) -> float:
        """Generation speed: frames rendered (generated, decoded, encoded) per wall-clock second."""
        return self.frames / self.wall_s if self.wall_s > 0 else float("inf")

    def summary(self) -> str:
        where = [str(p) for p in (self.out, self.latents_out) if p is not None]
        video = f", {self.size[0]}x{self.size[1]} h264" if self.size else ""
        return (f"rendered {self.frames} frames ({self.seconds:.2f} s at {self.fps:g} fps{video}) in {self.wall_s:.2f} s: "
                f"{self.frames_per_s:.1f} frames/s ({self.frames_per_s / self.model_fps:.2f}× real time) → {', '.join(where)}")


def frame_count(seconds: float, fps: float) -> int:
    return round(seconds * fps)


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
    if not job.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {job.seconds:g}")
    total = frame_count(job.seconds, bundle.fps)
    if total < 1:
        raise ValueError(f"{job.seconds:g} s at {bundle.fps:g} fps is less than one frame")
    fps_out = float(job.fps or bundle.fps)
    if not fps_out > 0:
        raise ValueError(f"--fps must be > 0, got {fps_out:g}")
    if job.out is not None:
        check_mp4_name(job.out)
    for path in (job.out, job.latents_out):
        if path is not None:
            check_writable(path)
    overrides = job.overrides(bundle.stream)
    config = replace(bundle.stream, **overrides)  # bad schedule / sampler combinations fail here
    if job.batch_slots is False and config.schedule != "timestep-slot":
        raise ValueError(f"--unbatched runs the timestep slots one by one, but this render's schedule is "
                         f"{config.schedule!r}: add --schedule timestep-slot, or drop --unbatched")
    video_frame = bundle.decoder().video_frame
    switches, warnings = plan_switches(job.timeline, bundle.fps, video_frame, config.chunk_frames, total, job.source)
    for entry in job.timeline:
        if (ignored := describe_prompt(bundle.text_encoder, entry.prompt).get("warning")) is not None:
            warnings.append(f"at {entry.at:g} s: {ignored}")
    for message in warnings if warn is not None else ():
        warn(message)
    opening = job.timeline[0]
    try:
        stream = backend.open(opening.prompt, overrides)
    except ValueError as exc:
        try:  # the prompt, or the settings?
            bundle.text_encoder.encode(opening.prompt)
        except ValueError:
            raise _entry_error(exc, opening, job.source) from None
        raise
    writer = (Mp4Writer(job.out, fps_out, job.size, job.scale_filter, job.crf, job.bitrate, job.preset)
              if job.out is not None else None)
    try:
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
                    writer.write(frames)
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
                    "timeline": timeline_json(job.timeline), "model_fps": repr(float(bundle.fps)), "fps": repr(fps_out),
                    "seconds": repr(float(job.seconds)), "frames": str(total),
                    "backend": getattr(backend, "name", type(backend).__name__), **meta_config})
            except BaseException:
                if job.out is not None:
                    Path(job.out).unlink(missing_ok=True)  # all or nothing
                raise
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        backend.close(stream)
    return RenderResult(frames=total, seconds=total / fps_out, model_fps=bundle.fps, fps=fps_out, wall_s=wall, chunks=chunks,
                        out=job.out, latents_out=job.latents_out, latent_shape=latent_shape,
                        size=writer.size if writer is not None else None, filter=writer.filter if writer else None,
                        switches=switches, warnings=warnings, config={"seed": config.seed, **meta_config}, stalls=stalls)
