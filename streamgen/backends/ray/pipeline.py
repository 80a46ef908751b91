"""Timestep pipeline parallelism (LiveAvatar's TPP, spec serving §4.3) on Ray actors.

A pipeline is S stage actors and one decoder actor in one placement group (PACK). Denoising step k
of every chunk of a stream runs in the stage that owns k (steps > stages: a stage owns several
consecutive steps) against that step's own KV cache, which never leaves the stage. Per chunk and
hop only the chunk's latents cross (WireWork: [1, F, 16, h, w] + 4 integers; prompt contexts go
once per context id). The prompt timeline, controls, acks and noise stay in the driver-side
`Stream`: this module only supplies its `Execution` (`PipelineExecution`), so a stream on the
pipeline is the in-process `timestep-slot` stream computed elsewhere — same latents.

Transport: plain actor calls with ObjectRef chaining, tensors as numpy (zero-copy in the object
store). Measured on the 2-core CPU box with other load present (load average 4–5.5;
`python -m streamgen.bench.pipeline --transport`: a payload through two chained actor calls and
back to the driver, p50 over 4 runs): 12–48 KB (tiny / d256 test chunks): numpy 2.3–3.7 ms, torch
pickled 3.7–6.8 ms, Compiled Graph 4.5–20 ms; 600 KB (one 832×480 bf16 chunk): numpy 8.2–12.7 ms,
torch 10.2–15.8 ms, Compiled Graph 2.4–8.8 ms. Compiled Graphs win on large payloads but every
participating actor busy-polls ~45% of a core while idle — a 2-stage pipeline burns a whole core
of a 2-core box, which is why they lose at small payloads here — and their teardown hangs after
≥20 executions of ≥1 MB payloads unless the actors are killed (spec ecosystem §2). In the
pipeline the whole Ray overhead per tick (tick wall − critical-path compute) was 5.5 ms for the
tiny model and 6.7–8.7 ms for a d256 random DiT — 3.1–5.0% of a 150–230 ms tick, the ≤ 5% goal;
the latents hop itself is ~1.5–2 ms of that. Chosen: ObjectRef chaining with numpy; Compiled
Graphs with NCCL channels are the step for GPU stages, where per-tick compute is smaller.

Ticks: the driver-side scheduler thread gathers the tick requests of all sessions that want one
and submits one `tick` per stage for all of them (stage s gets the ObjectRefs of stage s−1's
previous outputs as arguments, so latents go stage to stage without touching the driver), plus a
decoder call chained on the last stage's output. Stages run concurrently on different chunks.

Faults: every `ray.get` has a timeout. When a tick fails (an actor died, or a tick overran its
timeout), dead or hung actors are re-created in their placement-group bundle and every session of
the pipeline is rewound to its last delivered chunk: each stage rebuilds each slot's cache by one
re-cache pass from that slot's recent inputs, which the driver keeps (bounded), and the chunks that
were in flight re-enter from step 0 with the inputs they started with (no control is applied or
acknowledged twice). The client sees a stall reported on the next chunk (`FrameChunk.stall`,
`stream.stalls`), or `StreamFailedError` if recovery itself fails — never a frozen `next()`.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from ...cache.policy import make_policy
from ...engine.execution import ChunkInputs
from ...engine.stream import StreamConfig
from ..base import CapacityError, StreamFailedError
from .pipeline_config import (
    PipelineConfig,
    actor_options,
    bundle_of,
    slot_cache_bytes,
    split_steps,
)
from .stage import DecoderActor, StageActor
from .wire import (
    ChunkStart,
    Rebuild,
    SessionSpec,
    SlotRebuild,
    bundle_name,
    noise_source,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

@dataclass
class TickResult:
    chunk: int | None = None
    latents: Tensor | None = None
    frames: Tensor | None = None
    recovered: dict[str, Any] | None = None


class PipelineSession:
    """Driver-side state of one stream on a pipeline: what is in flight, and what a rebuild needs."""

    def __init__(self, pipeline: "Pipeline", config: StreamConfig, timesteps: list[float]) -> None:
        self.sid = uuid.uuid4().hex[:12]
        self.config = config
        self.timesteps = list(timesteps)
        self.timesteps_dirty = False
        self.steps = split_steps(len(timesteps), pipeline.cfg.stages, pipeline.cfg.stage_steps)
        self.prev_out: list[Any] = [None] * pipeline.cfg.stages
        self.starts: dict[int, ChunkStart] = {}  # registered chunks (in flight + recent delivered)
        self.contexts: dict[int, Tensor] = {}
        self.ctx_sent = -1
        self.capacity = make_policy(config.policy, **config.policy_settings).capacity_frames
        self.keep_chunks = -(-self.capacity // config.chunk_frames) + 1
        self.records: dict[int, deque] = {k: deque(maxlen=self.keep_chunks + len(timesteps) + 2) for k in range(1, len(timesteps))}
        self.delivered = 0
        self.feed: deque[int] = deque()  # registered chunks waiting to enter stage 0 (after a rewind)
        self.lock = threading.Lock()  # register/feed (caller thread) vs rewind/feed (scheduler thread)
        self.last_latents: Any = None
        self.stalls: list[dict[str, Any]] = []
        self.failed: BaseException | None = None
        self.kv_bytes = [len(steps) * pipeline.slot_bytes(config) for steps in self.steps]

    def register(self, chunk: int, inputs: ChunkInputs) -> ChunkStart:
        if inputs.context_id not in self.contexts:
            self.contexts[inputs.context_id] = inputs.context
        start = ChunkStart(chunk, inputs.context_id, inputs.recache_id, inputs.noise.seed)
        self.starts[chunk] = start
        return start

    def delivered_chunk(self, chunk: int, latents: Any) -> None:
        self.delivered = chunk + 1
        self.last_latents = latents
        for j in [j for j in self.starts if j < self.delivered - self.keep_chunks]:
            del self.starts[j]
        live = {s.context_id for s in self.starts.values()}
        for cid in [c for c in self.contexts if c < min(live, default=c) and c not in live]:
            del self.contexts[cid]

    def rebuild_for(self, steps: list[int], in_dim: int) -> Rebuild | None:
        """Each slot's recent inputs from delivered chunks (step 0: the chunks' initial noise, redrawn)."""
        f = self.delivered
        if f == 0:
            return None
        recent = sorted(j for j in self.starts if j < f)
        last = self.starts[f - 1]
        slots = []
        for k in steps:
            if k == 0:
                frames = [pack(noise_source(self.starts[j].seed, self.config, in_dim).initial(j)) for j in recent]
            else:
                frames = [x for j, x in self.records[k] if j < f]
            slots.append(SlotRebuild(k, frames))
        return Rebuild(f * self.config.chunk_frames, last.context_id, last.recache_id, slots)

    def rewind(self) -> dict[int, Any]:
        """Forget everything past the last delivered chunk; returns the contexts the rebuild needs."""
        f = self.delivered
        self.feed = deque(sorted(j for j in self.starts if j >= f))
        self.prev_out = [None] * len(self.prev_out)
        for k, rec in self.records.items():
            self.records[k] = deque(((j, x) for j, x in rec if j < f), maxlen=rec.maxlen)
        needed = {self.starts[j].context_id for j in self.feed}
        if f > 0:
            needed.add(self.starts[f - 1].context_id)
        self.ctx_sent = max(self.contexts, default=-1)
        return {cid: pack(self.contexts[cid]) for cid in needed}


class _Request:
    def __init__(self, session: PipelineSession, start: ChunkStart | None) -> None:
        self.session, self.start = session, start
        self.done = threading.Event()
        self.result: TickResult | None = None
        self.error: BaseException | None = None


_names = itertools.count()


class Pipeline:
    """S stage actors + a decoder actor in one placement group, and the driver-side tick scheduler."""

    def __init__(self, cfg: PipelineConfig, model_cfg=None) -> None:
        self.cfg = cfg
        self.name = cfg.name or f"tpp{next(_names)}"
        self.model_cfg = model_cfg
        bundles = [bundle_of(cfg.stage_resources)] * cfg.stages + [bundle_of(cfg.decoder_resources)]
        self.pg = placement_group(bundles, strategy=cfg.strategy, name=f"streamgen-{self.name}-{uuid.uuid4().hex[:6]}")
        if not self.pg.wait(cfg.start_timeout_s):
            remove_placement_group(self.pg)
            raise CapacityError(f"pipeline {self.name}: the cluster cannot place {bundles} ({cfg.strategy}) within "
                                f"{cfg.start_timeout_s:.0f} s; available: {ray.available_resources()}")
        self.actors: list[Any] = [self._make_actor(i) for i in range(cfg.stages + 1)]
        try:
            self.info = ray.get([a.ready.remote() for a in self.actors], timeout=cfg.start_timeout_s)
        except Exception:
            self.shutdown()
            raise
        self.sessions: dict[str, PipelineSession] = {}
        self._lock = threading.Lock()
        self._queue: list[_Request] = []
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self.ticks = 0
        self.recoveries: list[dict[str, Any]] = []
        self.timeline: deque[dict[str, Any]] = deque(maxlen=4096)  # per-tick timings (bench, /metrics)
        self._thread = threading.Thread(target=self._loop, name=f"streamgen-{self.name}", daemon=True)
        self._thread.start()

    # --- actors --------------------------------------------------------------------------------
    @property
    def stages(self) -> list[Any]:
        return self.actors[:-1]

    @property
    def decoder(self) -> Any:
        return self.actors[-1]

    def _make_actor(self, i: int) -> Any:
        cfg = self.cfg
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
        if i < cfg.stages:
            opts = actor_options(cfg.stage_resources)
            threads = cfg.threads or max(1, int(opts.get("num_cpus", 1)))
            return ray.remote(StageActor).options(scheduling_strategy=strategy, max_restarts=0, **opts).remote(
                cfg.model, i, threads, cfg.device, cfg.batched)
        opts = actor_options(cfg.decoder_resources)
        threads = max(1, int(opts.get("num_cpus", 1)))
        return ray.remote(DecoderActor).options(scheduling_strategy=strategy, max_restarts=0, **opts).remote(
            cfg.model, threads, cfg.device)

    def slot_bytes(self, config: StreamConfig) -> int:
        return slot_cache_bytes(config, self.model_cfg) if self.model_cfg is not None else 0

    # --- sessions ------------------------------------------------------------------------------
    def load(self) -> float:
        """Fraction of the most used stage's KV budget (for least-loaded placement)."""
        with self._lock:
            used = [sum(s.kv_bytes[i] for s in self.sessions.values()) for i in range(self.cfg.stages)]
            return max(max(used, default=0) / max(1, self.cfg.kv_budget_bytes), len(self.sessions) / self.cfg.max_sessions)

    def admit(self, config: StreamConfig, timesteps: list[float]) -> PipelineSession:
        """Register a stream's slots on every stage (memory-budgeted; CapacityError with the reason)."""
        sess = PipelineSession(self, config, timesteps)
        with self._lock:
            if self._closed:
                raise CapacityError(f"pipeline {self.name} is shut down")
            if len(self.sessions) >= self.cfg.max_sessions:
                raise CapacityError(f"pipeline {self.name}: {len(self.sessions)} of {self.cfg.max_sessions} sessions in use")
            for i in range(self.cfg.stages):
                used = sum(s.kv_bytes[i] for s in self.sessions.values())
                if used + sess.kv_bytes[i] > self.cfg.kv_budget_bytes:
                    raise CapacityError(
                        f"pipeline {self.name}: stage {i} KV budget {self.cfg.kv_budget_bytes / 2**20:.1f} MiB has "
                        f"{(self.cfg.kv_budget_bytes - used) / 2**20:.1f} MiB free; this stream needs "
                        f"{sess.kv_bytes[i] / 2**20:.1f} MiB ({len(sess.steps[i])} slot caches)")
            self.sessions[sess.sid] = sess
        try:
            with sess.lock:
                self._host(sess, contexts=None, rebuild=False)
        except Exception:
            with self._lock:
                self.sessions.pop(sess.sid, None)
            raise
        return sess

    def _host(self, sess: PipelineSession, contexts: dict[int, Any] | None, rebuild: bool) -> None:
        in_dim = self.model_cfg.in_dim if self.model_cfg is not None else 16
        refs = []
        for i, actor in enumerate(self.stages):
            spec = SessionSpec(sess.sid, sess.config, list(sess.timesteps), sess.steps[i])
            refs.append(actor.add_session.remote(spec, contexts, sess.rebuild_for(sess.steps[i], in_dim) if rebuild else None))
        refs.append(self.decoder.add_session.remote(sess.sid, sess.last_latents if rebuild else None))
        timeout = self.cfg.recover_timeout_s if rebuild else self.cfg.start_timeout_s
        kv = ray.get(refs, timeout=timeout)[:-1]
        sess.kv_bytes = [max(a, b) for a, b in zip(kv, sess.kv_bytes)]

    def close_session(self, sess: PipelineSession) -> None:
        with self._lock:
            if self.sessions.pop(sess.sid, None) is None:
                return
        for actor in self.actors:  # fire and forget: nothing waits on a closing stream
            try:
                actor.drop_session.remote(sess.sid)
            except Exception:  # an actor that is gone holds nothing
                pass

    def run(self, sess: PipelineSession, start: ChunkStart | None) -> TickResult:
        """One tick for this session (batched with every other session asking now); never hangs."""
        if sess.failed is not None:
            raise StreamFailedError(f"stream {sess.sid} on {self.name} failed: {sess.failed}") from sess.failed
        req = _Request(sess, start)
        with self._wake:
            if self._closed:
                raise StreamFailedError(f"pipeline {self.name} is shut down")
            self._queue.append(req)
            self._wake.notify()
        cfg = self.cfg
        limit = cfg.tick_timeout_s + cfg.ping_timeout_s * (cfg.stages + 1) + 2 * cfg.recover_timeout_s + 5
        if not req.done.wait(limit):
            raise StreamFailedError(f"stream {sess.sid} on {self.name}: no chunk within {limit:.0f} s")
        if req.error is not None:
            raise req.error
        return req.result  # type: ignore[return-value]

    # --- scheduler -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for r in self._queue:
                        r.error = StreamFailedError(f"pipeline {self.name} shut down")
                        r.done.set()
                    return
                batch, self._queue = self._queue, []
            try:
                self._tick(batch)
            except BaseException as exc:  # never let the scheduler die with requests waiting
                log.exception("pipeline %s: tick failed", self.name)
                for r in batch:
                    if not r.done.is_set():
                        r.error = StreamFailedError(f"pipeline {self.name}: {exc}")
                        r.done.set()

    def _tick(self, batch: list[_Request]) -> None:
        parts = [r.session for r in batch if r.session.sid in self.sessions]
        for r in batch:
            if r.session.sid not in self.sessions:
                r.error = StreamFailedError(f"stream {r.session.sid} is closed")
                r.done.set()
        batch = [r for r in batch if not r.done.is_set()]
        if not batch:
            return
        fed: dict[str, ChunkStart] = {}
        for r in batch:
            sess = r.session
            with sess.lock:
                if r.start is not None and r.start.chunk not in sess.feed and r.start.chunk >= sess.delivered:
                    sess.feed.append(r.start.chunk)
                if sess.feed:
                    fed[sess.sid] = sess.starts[sess.feed.popleft()]
        contexts, timesteps = {}, {}
        for sess in parts:
            new = {cid: pack(c) for cid, c in sess.contexts.items() if cid > sess.ctx_sent}
            if new:
                contexts[sess.sid] = new
                sess.ctx_sent = max(new)
            if sess.timesteps_dirty:
                timesteps[sess.sid] = list(sess.timesteps)
                sess.timesteps_dirty = False
        sids = [s.sid for s in parts]
        common = {"sessions": sids, "contexts": contexts, "timesteps": timesteps}
        t_submit = time.time()
        t0 = time.perf_counter()
        outs, reports = [], []
        for i, actor in enumerate(self.stages):
            if i == 0:
                manifest = {**common, "start": fed}
                refs: list[Any] = []
            else:
                refs, source = [], {}
                for sess in parts:
                    ref = sess.prev_out[i - 1]
                    if ref is None:
                        continue
                    if ref not in refs:
                        refs.append(ref)
                    source[sess.sid] = refs.index(ref)
                manifest = {**common, "source": source}
            out, report = actor.tick.options(num_returns=2).remote(manifest, *refs)
            outs.append(out)
            reports.append(report)
        decoded = self.decoder.decode.remote(sids, outs[-1])
        for sess in parts:
            sess.prev_out = list(outs)
        try:
            got = ray.get([decoded, *reports], timeout=self.cfg.tick_timeout_s)
        except ray.exceptions.RayError as exc:
            refs = [decoded, *reports, *outs]  # collect the failed tick's errors (no "unhandled error" logs)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
            for ref in ready:
                try:
                    ray.get(ref, timeout=0)
                except Exception:
                    pass
            self._recover(exc, batch)
            return
        wall = time.perf_counter() - t0
        dec, reps = got[0], got[1:]
        for rep in reps:
            for sid, seen in rep["seen"].items():
                sess = self.sessions.get(sid)
                if sess is not None:
                    for k, chunk, x in seen:  # copied: a view would pin the whole report in the object store
                        sess.records[k].append((chunk, x.copy() if hasattr(x, "copy") else x))
        self.ticks += 1
        self.timeline.append({"submit": t_submit, "wall_s": wall, "sessions": len(parts),
                              "stages": [{k: rep[k] for k in ("compute_s", "recv", "end", "forwards", "items", "out_bytes")}
                                         for rep in reps],
                              "decoder": {k: dec[k] for k in ("compute_s", "recv", "end")}, "done": time.time()})
        failed = {sid: (rep["stage"], reason) for rep in reps for sid, reason in rep["failed"].items()}
        for r in batch:
            sess = r.session
            if sess.sid in failed:  # its own step raised in a stage: this stream fails, the others go on
                stage, reason = failed[sess.sid]
                sess.failed = StreamFailedError(f"stream {sess.sid} failed in stage {stage}: {reason}")
                r.error = sess.failed
                r.done.set()
                continue
            item = dec["chunks"].get(sess.sid)
            if item is None:
                r.result = TickResult()
            else:
                chunk, frames, latents = item
                sess.delivered_chunk(chunk, latents.copy() if hasattr(latents, "copy") else latents)
                r.result = TickResult(chunk, unpack(latents), unpack(frames))
            r.done.set()

    # --- faults --------------------------------------------------------------------------------
    def _recover(self, error: BaseException, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        dead = self._find_dead()
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        if not dead and isinstance(error, RayTaskError) and not isinstance(error, RayActorError):
            # a stage raised outside any one stream's step (those fail alone, see StageActor.tick): the whole tick fails
            cause = getattr(error, "cause", None) or error
            for r in batch:
                r.session.failed = cause
                r.error = StreamFailedError(f"stream {r.session.sid}: {type(cause).__name__}: {cause}")
                r.error.__cause__ = cause
                r.done.set()
            return
        replaced = []
        try:
            for i in dead:
                self._replace(i)
                replaced.append("decoder" if i == self.cfg.stages else f"stage{i}")
            for sess in list(self.sessions.values()):
                with sess.lock:
                    self._host(sess, sess.rewind(), rebuild=True)
        except Exception as exc:
            msg = (f"pipeline {self.name}: recovery from {reason} failed after {time.perf_counter() - t0:.1f} s: "
                   f"{type(exc).__name__}: {exc}")
            log.error(msg)
            for sess in self.sessions.values():
                sess.failed = StreamFailedError(msg)
            for r in batch:
                r.error = StreamFailedError(msg)
                r.done.set()
            return
        event = {"time": time.time(), "reason": reason, "replaced": replaced, "recovery_s": time.perf_counter() - t0}
        self.recoveries.append(event)
        log.warning("pipeline %s recovered from %s in %.2f s (replaced: %s)", self.name, reason, event["recovery_s"], replaced)
        for sess in self.sessions.values():
            sess.stalls.append(event)
        for r in batch:
            r.result = TickResult(recovered=event)
            r.done.set()

    def _find_dead(self) -> list[int]:
        pings = [a.ping.remote() for a in self.actors]
        dead = []
        deadline = time.monotonic() + self.cfg.ping_timeout_s
        for i, ref in enumerate(pings):
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except RayActorError:
                dead.append(i)
            except GetTimeoutError:  # alive but stuck past the tick timeout: replace it too
                dead.append(i)
            except ray.exceptions.RayError:
                dead.append(i)
        return dead

    def _replace(self, i: int) -> None:
        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:
            pass
        actor = self._make_actor(i)
        self.info[i] = ray.get(actor.ready.remote(), timeout=self.cfg.recover_timeout_s)
        self.actors[i] = actor

    # --- reporting / shutdown ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            sessions = len(self.sessions)
            kv = [sum(s.kv_bytes[i] for s in self.sessions.values()) for i in range(self.cfg.stages)]
        return {"name": self.name, "model": bundle_name(self.cfg.model), "stages": self.cfg.stages, "sessions": sessions,
                "capacity": self.cfg.max_sessions, "kv_bytes": kv, "kv_budget_bytes": self.cfg.kv_budget_bytes,
                "ticks": self.ticks, "recoveries": len(self.recoveries), "actors": self.info}

    def shutdown(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass
