"""Session placement: whole streams (a `FrameStream`, exact semantics) inside worker actors.

Each worker builds the model once and hosts many streams; `RayBackend(mode="placement")` places a
new stream on the least-loaded worker whose memory budget fits it. Every `next()` returns, besides
the chunk, a small snapshot of the stream's driver-visible state (config, prompt timeline, queued
controls, chunk counter — the context tensor only when it changed). The driver keeps that and the
stream's recent latents (bounded by the cache window), so a stream can be moved (`drain`) or
resumed after its worker died: the new worker rebuilds the KV cache by one re-cache pass over the
recent latents at the context-noise level (the level the exact schedule's clean rerun writes), sets
the chunk counter, prompt timeline and noise seed, and re-applies controls sent after the snapshot.
The resumed stream continues at the same chunk index and position with the same prompt, noise
counters and decoder state (re-warmed from the last chunk); see `rebuild.py` for what a re-cache
does not recover (the sink's history).
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from torch import Tensor

from ...cache.policy import make_policy
from ...engine.execution import ExactExecution, RecentFrames
from ...engine.frame_stream import FrameChunk, FrameStream
from ...engine.prompts import Transition
from ...engine.stream import Stream, StreamConfig, Tag
from ..base import CapacityError, StreamFailedError
from .pipeline_config import actor_options, slot_cache_bytes
from .rebuild import fill_recent, rebuild_cache
from .stage import _device
from .wire import BundleRecipe, build_bundle, pack, unpack


@dataclass
class PlacementConfig:
    """Workers that each host whole streams; budgets and timeouts."""

    model: BundleRecipe = "tiny-random"
    workers: int = 2
    worker_resources: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    threads: int | None = None
    device: str | None = None
    memory_budget_bytes: int = 2 * 1024**3  # per worker: KV of all its streams
    max_sessions_per_worker: int = 8
    max_concurrency: int = 4  # controls run beside a next() in progress
    call_timeout_s: float = 30.0
    start_timeout_s: float = 180.0
    recover_timeout_s: float = 120.0


@dataclass
class StreamSnapshot:
    """A stream's state without its caches (those are rebuilt): enough to resume it elsewhere."""

    config: StreamConfig
    prompt: Any
    started: int
    context_id: int
    recache_id: int
    exec_recache_id: int
    context: Any = None  # packed; None: unchanged since the previous snapshot
    blend: Any = None  # (from, to, Transition, first chunk) with packed tensors, when `context` is sent
    pending: list = field(default_factory=list)
    control_seq: int = 0

    def merged(self, previous: "StreamSnapshot | None") -> "StreamSnapshot":
        if self.context is None and previous is not None:
            return replace(self, context=previous.context, blend=previous.blend)
        return self


def capture(stream: Stream, control_seq: int, last_context_id: int | None) -> StreamSnapshot:
    tl, ex = stream.timeline, stream.execution
    send = tl.context_id != last_context_id
    blend = None
    if send and tl.blend is not None:
        a, b, tr, first = tl.blend
        blend = (pack(a), pack(b), tr, first)
    return StreamSnapshot(stream.config, pack(stream.prompt) if isinstance(stream.prompt, Tensor) else stream.prompt,
                          ex.started, tl.context_id, tl.recache_id, getattr(ex, "recache_id", 0),
                          pack(tl.context) if send else None, blend, list(stream._pending), control_seq)


def restore(stream: Stream, snap: StreamSnapshot, recent: list[Tensor]) -> None:
    """Put a fresh stream (built from `snap.config`) at the snapshot's point, KV rebuilt by re-cache."""
    ex = stream.execution
    if not isinstance(ex, ExactExecution):
        raise StreamFailedError(f"placement resumes exact few-step streams; this one runs {stream.config.schedule} / "
                                f"{stream.config.sampler}")
    tl = stream.timeline
    tl.context, tl.context_id, tl.recache_id = unpack(snap.context), snap.context_id, snap.recache_id
    tl.blend = None if snap.blend is None else (unpack(snap.blend[0]), unpack(snap.blend[1]), snap.blend[2], snap.blend[3])
    stream.prompt = unpack(snap.prompt) if not isinstance(snap.prompt, str) else snap.prompt
    stream._pending = list(snap.pending)
    ex.started = snap.started
    ex.recache_id = snap.exec_recache_id
    ex.recent = fill_recent(ex.recent.capacity, recent)
    cross = stream.denoiser.cross_kv(tl.context_id, tl.context)
    rebuild_cache(stream.denoiser, ex.caches[0], ex.recent, cross, snap.started * stream.config.chunk_frames,
                  stream.config.context_noise)


def _apply_control(stream: Stream, kind: str, args: tuple) -> None:
    if kind == "prompt":
        prompt, transition, at_frame, tag = args
        stream.set_prompt(prompt, transition, at_frame, tag)
    elif kind == "params":
        params, tag = args
        stream.set_params(tag, **params)
    elif kind == "reset":
        stream.reset(*args)
    else:
        raise ValueError(f"unknown control {kind!r}")


class _Hosted:
    def __init__(self, fs: FrameStream) -> None:
        self.fs = fs
        self.lock = threading.Lock()
        self.control_seq = 0
        self.last_context_id: int | None = None


class StreamWorker:
    """Hosts whole frame streams (threaded actor: controls run beside a `next()` in progress)."""

    def __init__(self, recipe: BundleRecipe, index: int, threads: int | None = None, device: str | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.bundle = build_bundle(recipe)
        self.device = _device(device)
        if self.device.type != "cpu":
            self.bundle.dit.to(self.device)
        self.index = index
        self.streams: dict[str, _Hosted] = {}
        self.created = time.time()

    def ready(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": os.getpid(), "threads": torch.get_num_threads(), "node": os.uname().nodename}

    def ping(self) -> int:
        return self.index

    def open(self, sid: str, prompt: Any, overrides: dict[str, Any] | None, snapshot: StreamSnapshot | None = None,
             recent: list[Any] | None = None, controls: list[tuple] | None = None) -> dict[str, Any]:
        """A new stream, or (with `snapshot`) a stream resumed from another worker."""
        if snapshot is None:
            fs = FrameStream(self.bundle, prompt, overrides)
        else:
            cfg = snapshot.config
            fs = FrameStream(self.bundle, snapshot.prompt if isinstance(snapshot.prompt, str) else unpack(snapshot.prompt),
                             {f.name: getattr(cfg, f.name) for f in fields(cfg)})
            restore(fs.stream, snapshot, [unpack(x) for x in recent or []])
            if recent:
                fs.decoder.push(unpack(recent[-1]))  # re-warm the streaming decoder with the last chunk
        hosted = _Hosted(fs)
        if snapshot is not None:
            hosted.control_seq = snapshot.control_seq
            hosted.last_context_id = snapshot.context_id
            for seq, kind, args in controls or []:
                if seq <= snapshot.control_seq:
                    continue  # already in the snapshot (applied or queued)
                try:
                    _apply_control(fs.stream, kind, args)
                except ValueError:
                    pass  # refused when it was sent; it was never acknowledged
                hosted.control_seq = max(hosted.control_seq, seq)
        self.streams[sid] = hosted
        return {"kv_bytes": fs.stream.kv_bytes, "snapshot": capture(fs.stream, hosted.control_seq, None)}

    def close(self, sid: str) -> None:
        self.streams.pop(sid, None)

    def control(self, sid: str, seq: int, kind: str, args: tuple) -> None:
        hosted = self._get(sid)
        with hosted.lock:
            _apply_control(hosted.fs.stream, kind, args)
            hosted.control_seq = max(hosted.control_seq, seq)

    def next(self, sid: str) -> tuple[dict[str, Any], StreamSnapshot]:
        hosted = self._get(sid)
        t0 = time.perf_counter()
        chunk = hosted.fs.next()
        with hosted.lock:
            snap = capture(hosted.fs.stream, hosted.control_seq, hosted.last_context_id)
            hosted.last_context_id = snap.context_id
        return {"index": chunk.index, "first_frame": chunk.first_frame, "frames": pack(chunk.frames),
                "latents": pack(chunk.latents), "acks": chunk.acks, "compute_s": time.perf_counter() - t0}, snap

    def stats(self) -> dict[str, Any]:
        return {"worker": self.index, "streams": len(self.streams),
                "kv_bytes": sum(h.fs.stream.kv_bytes for h in self.streams.values())}

    def _get(self, sid: str) -> _Hosted:
        if sid not in self.streams:
            raise KeyError(f"worker {self.index}: no stream {sid}")
        return self.streams[sid]


class _Worker:
    """Driver-side record of one worker actor."""

    def __init__(self, index: int, actor: Any, info: dict[str, Any]) -> None:
        self.index, self.actor, self.info = index, actor, info
        self.generation = 0
        self.draining = False
        self.sessions: dict[str, "PlacedFrameStream"] = {}
        self.used_bytes = 0
        self.recovering = threading.Lock()  # one replacement at a time, without holding the placement's lock


def _cause(exc: RayTaskError) -> BaseException:
    return getattr(exc, "cause", None) or exc


class Placement:
    """Workers, least-loaded placement with a memory budget, drain and worker replacement."""

    def __init__(self, cfg: PlacementConfig, bundle) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self._lock = threading.RLock()
        actors = [self._make_actor(i) for i in range(cfg.workers)]
        infos = ray.get([a.ready.remote() for a in actors], timeout=cfg.start_timeout_s)
        self.workers = [_Worker(i, a, info) for i, (a, info) in enumerate(zip(actors, infos))]
        self.recoveries: list[dict[str, Any]] = []

    def _make_actor(self, index: int) -> Any:
        opts = actor_options(self.cfg.worker_resources)
        threads = self.cfg.threads or max(1, int(opts.get("num_cpus", 1)))
        return ray.remote(StreamWorker).options(max_restarts=0, max_concurrency=self.cfg.max_concurrency, **opts).remote(
            self.cfg.model, index, threads, self.cfg.device)

    def stream_bytes(self, config: StreamConfig) -> int:
        slots = len(config.steps) if config.schedule == "timestep-slot" else 1
        return slots * slot_cache_bytes(config, self.bundle.dit.cfg)

    def choose(self, need: int, exclude: int | None = None) -> _Worker:
        """The least-loaded worker (by budget fraction) with room for `need` bytes and one more stream."""
        cfg = self.cfg
        with self._lock:
            fits = [w for w in self.workers if not w.draining and w.index != exclude
                    and len(w.sessions) < cfg.max_sessions_per_worker and w.used_bytes + need <= cfg.memory_budget_bytes]
            if not fits:
                state = ", ".join(f"worker {w.index}: {len(w.sessions)} streams, {w.used_bytes / 2**20:.1f} of "
                                  f"{cfg.memory_budget_bytes / 2**20:.1f} MiB{' (draining)' if w.draining else ''}"
                                  for w in self.workers)
                raise CapacityError(f"no worker has room for a stream needing {need / 2**20:.1f} MiB of KV ({state})")
            return min(fits, key=lambda w: (w.used_bytes / cfg.memory_budget_bytes, len(w.sessions), w.index))

    def open(self, prompt: Any, overrides: dict[str, Any] | None) -> "PlacedFrameStream":
        config = replace(self.bundle.stream, **(overrides or {}))
        if isinstance(prompt, str):
            self.bundle.text_encoder.encode(prompt)  # a bad prompt fails here (ValueError), not on a worker
        need = self.stream_bytes(config)
        sid = uuid.uuid4().hex[:12]
        for attempt in range(2):
            with self._lock:
                worker = self.choose(need)
                worker.used_bytes += need
                generation = worker.generation
            try:
                info = ray.get(worker.actor.open.remote(sid, prompt, overrides), timeout=self.cfg.start_timeout_s)
                break
            except RayTaskError as exc:
                with self._lock:
                    worker.used_bytes -= need
                raise _cause(exc) from None
            except (RayActorError, GetTimeoutError) as exc:  # a dead worker nobody noticed yet: replace, retry
                with self._lock:
                    worker.used_bytes -= need
                if attempt:
                    raise StreamFailedError(f"could not open a stream: worker {worker.index} failed ({exc})") from exc
                self.worker_failed(worker, generation, f"{type(exc).__name__} while opening a stream")
            except Exception:
                with self._lock:
                    worker.used_bytes -= need
                raise
        stream = PlacedFrameStream(self, sid, worker, config, need, info["snapshot"])
        with self._lock:
            worker.sessions[sid] = stream
        return stream

    def close(self, stream: "PlacedFrameStream") -> None:
        with self._lock:
            w = stream.worker
            if w.sessions.pop(stream.sid, None) is not None:
                w.used_bytes -= stream.need
        try:
            w.actor.close.remote(stream.sid)
        except Exception:
            pass

    def worker_failed(self, worker: _Worker, generation: int, reason: str) -> None:
        """Replace a dead (or stuck) worker once; its streams resume on their next `next()`. The wait for the
        new actor (up to `recover_timeout_s`) holds only this worker's recovery lock: stats, admission and
        close go on meanwhile."""
        with worker.recovering:
            with self._lock:
                if worker.generation != generation:
                    return  # already replaced by another stream's call
            t0 = time.perf_counter()
            try:
                ray.kill(worker.actor, no_restart=True)
            except Exception:
                pass
            actor = self._make_actor(worker.index)
            info = ray.get(actor.ready.remote(), timeout=self.cfg.recover_timeout_s)
            with self._lock:
                worker.info, worker.actor = info, actor
                worker.generation += 1
                for s in worker.sessions.values():
                    s.needs_resume = True
                    s._pending_stall = {"events": 1, "reason": f"worker {worker.index} replaced ({reason})",
                                        "recovery_s": time.perf_counter() - t0, "replaced": [f"worker{worker.index}"]}
                self.recoveries.append({"time": time.time(), "worker": worker.index, "reason": reason,
                                        "replace_s": time.perf_counter() - t0})

    def move(self, stream: "PlacedFrameStream", target: _Worker) -> None:
        """Resume `stream` on `target` from its driver-side snapshot (caller holds the stream's lock)."""
        source = stream.worker
        ray.get(target.actor.open.remote(stream.sid, None, None, stream.snapshot, list(stream.recent.chunks_packed()),
                                         list(stream.controls)), timeout=self.cfg.recover_timeout_s)
        with self._lock:
            if source.sessions.pop(stream.sid, None) is not None:
                source.used_bytes -= stream.need
            target.sessions[stream.sid] = stream
            target.used_bytes += stream.need
        if source is not target and not stream.needs_resume:
            try:
                source.actor.close.remote(stream.sid)
            except Exception:
                pass
        stream.worker = target
        stream.generation = target.generation
        stream.needs_resume = False
        stream.controls.clear()

    def drain(self, index: int, remove: bool = False) -> list[str]:
        """Move every stream off worker `index` (no new streams go there); returns the moved ids."""
        worker = self.workers[index]
        with self._lock:
            worker.draining = True
            streams = list(worker.sessions.values())
        moved = []
        for stream in streams:
            with stream._lock:
                target = self.choose(stream.need, exclude=index)
                self.move(stream, target)
                stream._pending_stall = {"events": 1, "reason": f"moved from worker {index} (drain)", "recovery_s": 0.0,
                                         "replaced": []}
            moved.append(stream.sid)
        if remove:
            try:
                ray.kill(worker.actor, no_restart=True)
            except Exception:
                pass
        return moved

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"workers": [{"index": w.index, "streams": len(w.sessions), "kv_bytes": w.used_bytes,
                                 "draining": w.draining, "generation": w.generation} for w in self.workers],
                    "streams": sum(len(w.sessions) for w in self.workers),
                    "capacity": self.cfg.workers * self.cfg.max_sessions_per_worker,
                    "memory_budget_bytes": self.cfg.memory_budget_bytes, "recoveries": len(self.recoveries)}

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:
                pass


class _Recent(RecentFrames):
    def chunks_packed(self) -> list[Any]:
        return [pack(x) for x in self.chunks]


class _StreamView:
    """What callers read of `FrameStream.stream` (prompt, config, frame), from the latest snapshot."""

    def __init__(self, owner: "PlacedFrameStream") -> None:
        self._owner = owner

    @property
    def prompt(self) -> Any:
        p = self._owner.snapshot.prompt
        return p if isinstance(p, str) else unpack(p)

    @property
    def config(self) -> StreamConfig:
        return self._owner.snapshot.config

    @property
    def frame(self) -> int:
        return self._owner.snapshot.started * self._owner.snapshot.config.chunk_frames


class PlacedFrameStream(FrameStream):
    """Driver-side handle of a stream hosted by a worker actor (FrameStream-compatible; `.stream`
    is a read-only view of prompt / config / frame)."""

    def __init__(self, placement: Placement, sid: str, worker: _Worker, config: StreamConfig, need: int,
                 snapshot: StreamSnapshot) -> None:
        self.placement, self.sid, self.worker, self.need = placement, sid, worker, need
        self.bundle = placement.bundle
        self.fps = placement.bundle.fps
        self.generation = worker.generation
        self.snapshot = snapshot
        self.stream = _StreamView(self)
        self.recent = _Recent(make_policy(config.policy, **config.policy_settings).capacity_frames)
        self.controls: list[tuple] = []  # (seq, kind, args) sent since the last snapshot
        self._seq = 0
        self._lock = threading.RLock()  # one next() / move at a time
        self._ctl_lock = threading.Lock()  # controls in order (they do not wait for next())
        self.needs_resume = False
        self.stalls = 0
        self._pending_stall: dict[str, Any] | None = None
        self.closed = False

    # --- generation ----------------------------------------------------------------------------
    def next(self) -> FrameChunk:
        with self._lock:
            if self.closed:
                raise StreamFailedError("stream is closed")
            t0 = time.perf_counter()
            stall_reason = None
            for attempt in range(2):
                try:
                    if self.needs_resume:
                        self.placement.move(self, self.placement.choose(0) if self.worker.draining else self.worker)
                    out, snap = ray.get(self.worker.actor.next.remote(self.sid), timeout=self.placement.cfg.call_timeout_s)
                    break
                except RayTaskError as exc:
                    raise _cause(exc) from None  # the stream's own error (e.g. a cache policy refusing): as in process
                except (RayActorError, GetTimeoutError, ray.exceptions.RayError) as exc:
                    stall_reason = f"{type(exc).__name__} on worker {self.worker.index}"
                    if attempt:
                        raise StreamFailedError(f"stream {self.sid}: {stall_reason} again after resuming") from exc
                    try:
                        self.placement.worker_failed(self.worker, self.generation, stall_reason)
                        self.needs_resume = True
                    except Exception as rexc:
                        raise StreamFailedError(f"stream {self.sid}: worker {self.worker.index} failed ({stall_reason}) "
                                                f"and could not be replaced: {rexc}") from rexc
            self.snapshot = snap.merged(self.snapshot)
            with self._ctl_lock:
                self.controls = [c for c in self.controls if c[0] > snap.control_seq]
            latents = unpack(out["latents"])
            self.recent.push(latents)
            stall = self._pending_stall
            self._pending_stall = None
            if stall_reason is not None:
                stall = {"events": 1, "reason": stall_reason, "recovery_s": time.perf_counter() - t0,
                         "replaced": [f"worker{self.worker.index}"]}
            if stall:
                self.stalls += 1
            return FrameChunk(out["index"], out["first_frame"], unpack(out["frames"]), latents, out["acks"], stall)

    # --- controls ------------------------------------------------------------------------------
    @property
    def reset_pending(self) -> bool:
        """A reset sent and not yet covered by a snapshot (it lands with the next chunk)."""
        with self._ctl_lock:
            return any(kind == "reset" for _, kind, _ in self.controls)

    def _control(self, kind: str, args: tuple) -> None:
        """Sent to the worker at once (validated there: a bad prompt raises here) and logged until a
        snapshot covers it, so a resumed stream gets it too."""
        with self._ctl_lock:
            self._seq += 1
            seq = self._seq
            try:
                ray.get(self.worker.actor.control.remote(self.sid, seq, kind, args), timeout=self.placement.cfg.call_timeout_s)
            except RayTaskError as exc:
                raise _cause(exc) from None
            except (RayActorError, GetTimeoutError):
                pass  # the worker is gone: the control is replayed where the stream resumes
            self.controls.append((seq, kind, args))

    def set_prompt(self, prompt: str, transition: Transition | None = None, at_frame: int | None = None,
                   tag: Tag = None) -> None:
        self._control("prompt", (prompt, transition, at_frame, tag))

    def set_params(self, tag: Tag = None, **params: Any) -> None:
        self._control("params", (params, tag))

    def reset(self, tag: Tag = None) -> None:
        self._control("reset", (tag,))

    def close(self) -> None:
        if not self.closed:
            self.placement.close(self)
        self.closed = True
