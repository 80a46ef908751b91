"""Running one job: `streamgen render`'s loop (`render.job`), resumable.

The chunks are the ones `run_job` computes (same `RenderJob` overrides, same timeline switches
queued before the first chunk, same trimming of the last chunk), so the job's latents equal those of
`streamgen render` of the same spec. Every `checkpoint_every` chunks the open segment is committed,
then the checkpoint written; a job interrupted anywhere (crash, server stop) starts again from its
last checkpoint and computes exactly the chunks it lost. A cancel stops at the next chunk boundary
and removes the job's files: nothing half-written is left. Outputs, in the job's folder:
`output.mp4` (round(seconds × fps) frames) and `latents.safetensors` (what `--latents-out` writes).
"""
from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..cache.policy import make_policy
from ..engine.frame_stream import FrameStream
from ..render.job import (
    LATENTS_FORMAT,
    RenderJob,
    frame_count,
    latent_for_video,
    plan_switches,
)
from ..render.timeline import timeline_json
from ..render.writer import parse_output_size, save_latents
from . import checkpoint
from .segments import LATENTS as SEGMENT_LATENTS
from .segments import VIDEO, SegmentWriter, drop_uncommitted, join, joined_latents
from .spec import JobSpec, SpecError
from .store import Job, JobStore

OUTPUT = "output.mp4"
LATENTS = "latents.safetensors"
CHECKPOINT = "checkpoint.pkl"
PROGRESS_EVERY_S = 0.5  # progress events at most this often (Cog's webhook throttle)


def render_job(spec: JobSpec, bundle) -> RenderJob:
    """The `RenderJob` of a spec on this server's model; SpecError (field named) for what the model refuses."""
    if spec.model is not None and spec.model != bundle.name:
        raise SpecError("model", f"this server serves {bundle.name!r}, not {spec.model!r}")
    entries = spec.entries()
    for e in entries:
        try:
            bundle.text_encoder.encode(e.prompt)
        except ValueError as exc:
            raise SpecError("timeline" if len(entries) > 1 else "prompt", f"entry [{e.index}]: {exc}") from None
    job = RenderJob(timeline=entries, seconds=spec.seconds, seed=spec.seed, fps=spec.fps,
                    size=None if spec.size is None else parse_output_size(spec.size), crf=spec.crf, preset=spec.preset,
                    schedule=spec.schedule, policy=spec.policy, policy_settings=dict(spec.policy_settings),
                    source="timeline")
    try:  # bad schedule / policy combinations and policy settings fail here, as in `run_job`
        config = replace(bundle.stream, **job.overrides(bundle.stream))
        make_policy(config.policy, **config.policy_settings)
    except (TypeError, ValueError) as exc:
        raise SpecError("policy" if spec.policy or spec.policy_settings else "schedule", str(exc)) from None
    if frame_count(spec.seconds, bundle.fps) < 1:
        raise SpecError("seconds", f"{spec.seconds:g} s at {bundle.fps:g} fps is less than one frame")
    return job


class Interrupted(Exception):
    """The runner was asked to stop (server shutdown) and checkpointed: the job stays `running`, resumable."""


class Preempted(Exception):
    """A live session needed the job's stream: it checkpointed at a chunk boundary and released it."""


def run(job: Job, store: JobStore, backend, stop: threading.Event, cancel: threading.Event,
        checkpoint_every: int = 4, preempt: threading.Event | None = None) -> str:
    """Run (or resume) a job in state running to its end; returns the final state. Raises Interrupted
    when `stop` is set and Preempted when `preempt` is (each after a checkpoint at that chunk boundary;
    the stream is released), and CapacityError when the backend has no room for another stream (the job
    stays running: it resumes later)."""
    bundle = backend.bundle
    folder = store.job_dir(job.id)
    folder.mkdir(parents=True, exist_ok=True)
    spec_text = job.spec.canonical()
    rj = render_job(job.spec, bundle)
    total = frame_count(rj.seconds, bundle.fps)
    fps_out = float(rj.fps or bundle.fps)
    fs = backend.open(rj.timeline[0].prompt, rj.overrides(bundle.stream))
    writer: SegmentWriter | None = None
    try:
        if type(fs) is not FrameStream:
            raise RuntimeError(f"render jobs checkpoint in-process streams: run the server with --backend local "
                               f"(this one opened a {type(fs).__name__})")
        saved = checkpoint.load(folder / CHECKPOINT)
        if saved is not None and saved.spec != spec_text:
            raise RuntimeError(f"the checkpoint in {folder} belongs to another spec")
        if saved is not None:
            checkpoint.restore(fs, saved.stream)
            drop_uncommitted(folder, saved.segments)
            done, chunks, segments = saved.frames, saved.chunks, list(saved.segments)
            store.log(job.id, "resumed", {"frames_done": done, "chunks": chunks})
        else:
            drop_uncommitted(folder, [])
            config = fs.stream.config
            switches, _ = plan_switches(rj.timeline, bundle.fps, fs.decoder.video_frame, config.chunk_frames, total,
                                        rj.source)
            for s in switches[1:]:
                fs.set_prompt(s.entry.prompt, s.entry.transition, at_frame=s.latent_frame)
            done, chunks, segments = 0, 0, []
        writer = SegmentWriter(folder, fps_out, rj.size, rj.crf, rj.preset, done)
        t0, start_done, last_event = time.perf_counter(), done, 0.0

        def commit() -> None:
            t = time.perf_counter()
            name = writer.commit()
            if name is not None:
                segments.append(name)
            nbytes = checkpoint.save(folder / CHECKPOINT, checkpoint.Checkpoint(
                spec_text, chunks, done, list(segments), checkpoint.capture(fs)))
            store.log(job.id, "checkpoint", {"frames_done": done, "chunks": chunks, "bytes": nbytes,
                                             "ms": round((time.perf_counter() - t) * 1000, 2)})

        with torch.no_grad():
            while done < total:
                if cancel.is_set():
                    writer.abort()
                    shutil.rmtree(folder, ignore_errors=True)
                    store.set_state(job.id, "cancelled", frames_done=done)
                    return "cancelled"
                if stop.is_set():
                    commit()
                    raise Interrupted(job.id)
                if preempt is not None and preempt.is_set():
                    commit()
                    raise Preempted(job.id)
                chunk = fs.next()
                chunks += 1
                frames = chunk.frames[: total - done]
                writer.write(frames, chunk.latents)
                done += len(frames)
                for ack in chunk.acks:
                    store.log(job.id, "prompt", {"frame": ack.frame, "chunk": ack.chunk})
                now = time.perf_counter()
                fps = (done - start_done) / (now - t0) if now > t0 else None
                report = now - last_event >= PROGRESS_EVERY_S or done == total
                store.progress(job.id, done, fps, event=report)
                if report:
                    last_event = now
                if chunks % checkpoint_every == 0 and done < total:
                    commit()
        name = writer.commit()
        if name is not None:
            segments.append(name)
        written = join([folder / f"{s}{VIDEO}" for s in segments], folder / OUTPUT)
        if written != total:
            raise RuntimeError(f"the joined video has {written} frames, expected {total}")
        config = fs.stream.config
        kept = latent_for_video(total, fs.decoder.video_frame)  # as `run_job`: the latents of the frames written
        save_latents(folder / LATENTS, joined_latents(folder, segments)[:, :kept], {
            "format": LATENTS_FORMAT, "model": bundle.name, "seed": str(config.seed), "job": job.id,
            "timeline": timeline_json(rj.timeline), "model_fps": repr(float(bundle.fps)), "fps": repr(fps_out),
            "seconds": repr(float(rj.seconds)), "frames": str(total), "schedule": config.schedule,
            "policy": config.policy})
        (folder / CHECKPOINT).unlink(missing_ok=True)  # first: a crash from here on redoes the job, never half-resumes it
        for s in segments:
            for suffix in (VIDEO, SEGMENT_LATENTS):
                (folder / f"{s}{suffix}").unlink(missing_ok=True)
        store.set_state(job.id, "succeeded", frames_done=done)
        return "succeeded"
    except (Interrupted, Preempted):
        raise
    except Exception as exc:  # noqa: BLE001 — any failure is the job's, reported in its row; the server goes on
        if writer is not None:
            writer.abort()
        shutil.rmtree(folder, ignore_errors=True)  # a failed job leaves no partial output
        store.set_state(job.id, "failed", error=f"{type(exc).__name__}: {exc}")
        return "failed"
    finally:
        backend.close(fs)


def output_path(store: JobStore, job_id: str) -> Path:
    return store.job_dir(job_id) / OUTPUT
