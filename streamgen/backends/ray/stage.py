"""The actors of a timestep pipeline: `StageActor` (a set of consecutive denoising steps of every
session it hosts, each step a `TimestepSlot` with its own KV cache) and `DecoderActor` (each
session's streaming frame decoder). Plain classes here; `pipeline.py` wraps them with `ray.remote`
and the resources of the pipeline's placement group.

One `tick` of a stage advances every piece of work it holds by one denoising step: the work that
arrived from the previous stage (or, for stage 0, the chunks that start now) and the work it passed
from one of its own steps to the next on the previous tick. All of it — several steps of one
session, and several sessions of the same geometry and cache policy — runs as one batched forward
(`run_slots(..., batched=True)`), which is exactly what the in-process timestep-slot execution
does, so the latents are the same.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any

import torch

from ...cache.policy import make_policy
from ...engine.execution import ChunkInputs, SlotWork, TimestepSlot, run_slots
from ...models.decoders import FrameDecoder
from ...sampling.denoiser import Denoiser
from ...sampling.few_step import FewStepSampler
from ...sampling.schedule import FlowSchedule
from .rebuild import fill_recent, rebuild_cache
from .wire import (
    BundleRecipe,
    ChunkStart,
    Rebuild,
    SessionSpec,
    WireWork,
    build_bundle,
    nbytes,
    noise_source,
    pack,
    unpack,
)

CONTEXTS_KEPT = 64  # per session, hard cap on remembered prompt contexts (normally pruned to those still in use)


def _setup_threads(threads: int | None) -> int:
    """Ray sets OMP_NUM_THREADS=1 for actors with ≤1 CPU; set torch's count explicitly (spec §2)."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _device(device: str | None) -> torch.device:
    """The actor's device: as configured, else cuda when Ray gave this actor a GPU."""
    if device:
        return torch.device(device)
    try:
        import ray

        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:
        gpus = []
    return torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")


def group_key(spec: SessionSpec) -> tuple:
    """Sessions with equal keys can share one forward (same shapes, same cache policy settings)."""
    c = spec.config
    return (c.policy, repr(sorted(c.policy_settings.items())), c.latent_height, c.latent_width, c.chunk_frames, str(c.dtype),
            c.batch_slots)


class _GroupDenoiser(Denoiser):
    """One forward for the calls of many sessions (same shapes and policy). Cross-attention K/V are
    memoized per session — keys are (session, context id) — bounded, and dropped with the session."""

    def __init__(self, model, policy) -> None:
        super().__init__(model, policy)
        self.memos: dict[str, OrderedDict] = {}
        self.memo_size: dict[str, int] = {}

    @torch.no_grad()
    def cross_kv(self, key, context):
        sid, cid = key
        memo = self.memos.setdefault(sid, OrderedDict())
        if cid in memo:
            memo.move_to_end(cid)
        else:
            memo[cid] = self.model.cross_kv(context)
            while len(memo) > self.memo_size.get(sid, 4):
                memo.popitem(last=False)
        return memo[cid]

    def drop(self, sid: str) -> None:
        self.memos.pop(sid, None)
        self.memo_size.pop(sid, None)


class _StageSession:
    """One stream's slots in one stage."""

    def __init__(self, spec: SessionSpec, model, device: torch.device) -> None:
        self.spec = spec
        cfg, mcfg = spec.config, model.cfg
        self.sampler = FewStepSampler(FlowSchedule(cfg.shift), list(spec.timesteps), cfg.context_noise)
        self.policy = make_policy(cfg.policy, **cfg.policy_settings)
        tokens = (cfg.latent_height // mcfg.patch_size[1]) * (cfg.latent_width // mcfg.patch_size[2])
        self.slots: dict[int, TimestepSlot] = {
            k: TimestepSlot(k, self.sampler, self.policy.allocate(mcfg.num_layers, 1, tokens, mcfg.num_heads, mcfg.head_dim,
                                                                  cfg.dtype, device), cfg.chunk_frames)
            for k in spec.steps}
        self.in_flight: dict[int, SlotWork] = {}  # step → work waiting for that step (handed over inside the stage)
        self.contexts: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.noise: dict[int, Any] = {}
        self.key = group_key(spec)
        self.in_dim = mcfg.in_dim
        self.device = device

    @property
    def kv_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots.values())

    def add_context(self, cid: int, context) -> None:
        self.contexts[cid] = unpack(context, self.device)
        while len(self.contexts) > CONTEXTS_KEPT:
            self.contexts.popitem(last=False)

    def prune_contexts(self, newest_seen: int) -> None:
        """Context ids grow with the chunk index and chunks arrive in order, so contexts older than the
        oldest work still held here (or than the newest arrival, when none is held) are never used again."""
        held = [w.inputs.context_id[1] for w in self.in_flight.values()]  # type: ignore[index]
        floor = min(held) if held else newest_seen
        for cid in [c for c in self.contexts if c < floor]:
            del self.contexts[cid]

    def inputs(self, sid: str, context_id: int, recache_id: int, seed: int) -> ChunkInputs:
        if context_id not in self.contexts:
            raise KeyError(f"session {sid}: context {context_id} never reached this stage")
        if seed not in self.noise:
            self.noise[seed] = noise_source(seed, self.spec.config, self.in_dim, self.device)
        # cross-attention K/V are memoized per context id in the (shared) Denoiser: make the key per session
        return ChunkInputs(self.contexts[context_id], (sid, context_id), recache_id, self.noise[seed])  # type: ignore[arg-type]


class StageActor:
    """Hosts steps of many sessions; the model is built once, here (never shipped per call)."""

    def __init__(self, recipe: BundleRecipe, index: int, threads: int | None = None, device: str | None = None,
                 batched: bool = True) -> None:
        self.threads = _setup_threads(threads)
        self.device = _device(device)
        bundle = build_bundle(recipe)
        self.model = bundle.dit.to(self.device).eval()
        self.index = index
        self.batched = batched
        self.sessions: dict[str, _StageSession] = {}
        self.denoisers: dict[tuple, Denoiser] = {}
        self.ticks = 0
        self.busy_s = 0.0
        self.created = time.time()

    # --- control -------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        return {"stage": self.index, "pid": os.getpid(), "threads": self.threads, "device": str(self.device),
                "node": os.uname().nodename}

    def ping(self) -> int:
        return self.index

    def add_session(self, spec: SessionSpec, contexts: dict[int, Any] | None = None, rebuild: Rebuild | None = None) -> int:
        """Host `spec.steps` of a stream (fresh caches, or rebuilt by re-cache after a fault); returns KV bytes."""
        sess = _StageSession(spec, self.model, self.device)
        for cid, ctx in (contexts or {}).items():
            sess.add_context(cid, ctx)
        if sess.key not in self.denoisers:
            self.denoisers[sess.key] = _GroupDenoiser(self.model, sess.policy)
        self.denoisers[sess.key].drop(spec.sid)
        self.denoisers[sess.key].memo_size[spec.sid] = max(4, len(spec.timesteps) + 1)
        if rebuild is not None and sess.slots:
            self._rebuild(spec.sid, sess, rebuild)
        self.sessions[spec.sid] = sess
        return sess.kv_bytes

    def drop_session(self, sid: str) -> None:
        sess = self.sessions.pop(sid, None)
        if sess is not None:
            self.denoisers[sess.key].drop(sid)

    def _rebuild(self, sid: str, sess: _StageSession, rb: Rebuild) -> None:
        denoiser = self.denoisers[sess.key]
        inputs = sess.inputs(sid, rb.context_id, rb.recache_id, sess.spec.config.seed)
        cross = denoiser.cross_kv(inputs.context_id, inputs.context)
        for slot_rb in rb.slots:
            slot = sess.slots[slot_rb.step]
            slot.recent = fill_recent(slot.cache.capacity_frames, [unpack(f, self.device) for f in slot_rb.frames])
            rebuild_cache(denoiser, slot.cache, slot.recent, cross, rb.end_frame, sess.sampler.timesteps[slot.step])
            slot.recache_id = rb.recache_id

    def stats(self) -> dict[str, Any]:
        return {"stage": self.index, "sessions": len(self.sessions), "ticks": self.ticks, "busy_s": self.busy_s,
                "kv_bytes": sum(s.kv_bytes for s in self.sessions.values()), "uptime_s": time.time() - self.created}

    # --- the tick ------------------------------------------------------------------------------
    def tick(self, manifest: dict[str, Any], *incoming: dict[str, WireWork]) -> tuple[dict[str, WireWork], dict[str, Any]]:
        """Advance the listed sessions by one step everywhere in this stage.

        manifest: sessions (ids), start ({sid: ChunkStart}, stage 0), source ({sid: index into
        `incoming`}, later stages), contexts ({sid: {context_id: packed}}), timesteps ({sid: list}).
        Returns (work leaving this stage: {sid: WireWork}, report for the driver: the inputs each
        slot saw — kept there, bounded, to rebuild caches after a fault — and timings).
        """
        t_recv = time.time()
        t0 = time.perf_counter()
        for sid, contexts in manifest.get("contexts", {}).items():
            if sid in self.sessions:
                for cid, ctx in contexts.items():
                    self.sessions[sid].add_context(cid, ctx)
        for sid, steps in manifest.get("timesteps", {}).items():
            if sid in self.sessions:
                self.sessions[sid].sampler.timesteps = list(steps)
        out: dict[str, WireWork] = {}
        newest: dict[str, int] = {}
        groups: dict[tuple, list[tuple[str, _StageSession, int, SlotWork]]] = {}
        for sid in manifest["sessions"]:
            sess = self.sessions.get(sid)
            if sess is None:  # closed while this tick was on its way: nothing to do
                continue
            arriving = self._arriving(sid, sess, manifest, incoming)
            if not sess.slots:  # this stream has fewer steps than stages: pass through
                if arriving is not None:
                    out[sid] = arriving
                continue
            if arriving is not None:
                newest[sid] = arriving.context_id
                first = sess.spec.steps[0]
                inputs = sess.inputs(sid, arriving.context_id, arriving.recache_id, arriving.seed)
                x = inputs.noise.initial(arriving.chunk) if arriving.x is None else unpack(arriving.x, self.device)
                sess.in_flight[first] = SlotWork(arriving.chunk, x, inputs)
            for k in sess.spec.steps:
                work = sess.in_flight.pop(k, None)
                if work is not None:
                    groups.setdefault(sess.key, []).append((sid, sess, k, work))
        seen: dict[str, list] = {}
        failed: dict[str, str] = {}
        forwards = 0
        for key, items in groups.items():
            batched = self.batched and key[-1]  # the stream's own batch_slots, as in process
            done, ran = self._run_group(self.denoisers[key], items, batched, failed)
            forwards += ran
            for (sid, sess, k, work), new in zip(items, done):
                if new is None:  # this stream's step raised: it fails alone, the tick goes on for the others
                    continue
                if k != 0:  # step 0's inputs are the chunk's initial noise: the driver can redraw it
                    seen.setdefault(sid, []).append((k, work.chunk, pack(work.x)))
                if k == sess.spec.steps[-1]:
                    out[sid] = WireWork(new.chunk, pack(new.x), work.inputs.context_id[1], work.inputs.recache_id,
                                        work.inputs.noise.seed)
                else:
                    sess.in_flight[k + 1] = new
        for sid in failed:
            out.pop(sid, None)
            self.drop_session(sid)
        for sid, cid in newest.items():
            if sid in self.sessions:
                self.sessions[sid].prune_contexts(cid)
        compute = time.perf_counter() - t0
        self.ticks += 1
        self.busy_s += compute
        return out, {"stage": self.index, "seen": seen, "failed": failed, "compute_s": compute, "recv": t_recv,
                     "end": time.time(), "forwards": forwards, "items": sum(len(v) for v in groups.values()),
                     "out_bytes": nbytes(out)}

    @staticmethod
    def _run_group(denoiser: Denoiser, items: list[tuple[str, _StageSession, int, SlotWork]], batched: bool,
                   failed: dict[str, str]) -> tuple[list[SlotWork | None], int]:
        """The group's steps as one forward; if that raises, each stream's alone, so that only the streams
        whose own step raises fail (named in `failed`, their result None). Returns results and forwards."""
        slots = [sess.slots[k] for _, sess, k, _ in items]
        works = [w for *_, w in items]
        try:
            return list(run_slots(denoiser, slots, works, batched)), 1 if batched else len(items)
        except Exception as exc:
            if len(items) == 1:
                failed[items[0][0]] = f"{type(exc).__name__}: {exc}"[:500]
                return [None], 1
        done: list[SlotWork | None] = []
        for item, slot, work in zip(items, slots, works):
            if item[0] in failed:
                done.append(None)
                continue
            try:
                done.extend(run_slots(denoiser, [slot], [work], False))
            except Exception as exc:
                failed[item[0]] = f"{type(exc).__name__}: {exc}"[:500]
                done.append(None)
        return done, 1 + len(items)

    @staticmethod
    def _arriving(sid: str, sess: _StageSession, manifest: dict[str, Any], incoming: tuple) -> WireWork | None:
        if "start" in manifest:
            start: ChunkStart | None = manifest["start"].get(sid)
            return None if start is None else WireWork(start.chunk, None, start.context_id, start.recache_id, start.seed)
        src = manifest.get("source", {}).get(sid)
        return None if src is None else incoming[src].get(sid)


class DecoderActor:
    """Each session's streaming decoder (its temporal state lives here between chunks)."""

    def __init__(self, recipe: BundleRecipe, threads: int | None = None, device: str | None = None) -> None:
        self.threads = _setup_threads(threads)
        self.device = _device(device)
        self.bundle = build_bundle(recipe)
        self.decoders: dict[str, FrameDecoder] = {}
        self.last: dict[str, int] = {}
        self.busy_s = 0.0

    def ready(self) -> dict[str, Any]:
        return {"decoder": True, "pid": os.getpid(), "threads": self.threads, "device": str(self.device)}

    def ping(self) -> int:
        return -1

    def add_session(self, sid: str, warm: Any = None) -> None:
        """A fresh decoder; `warm` (the last delivered latents) restores its temporal state after a fault."""
        dec = self.bundle.decoder()
        if warm is not None:
            dec.push(unpack(warm, self.device))
        self.decoders[sid] = dec
        self.last[sid] = -1

    def drop_session(self, sid: str) -> None:
        self.decoders.pop(sid, None)
        self.last.pop(sid, None)

    def decode(self, sessions: list[str], finished: dict[str, WireWork]) -> dict[str, Any]:
        """Decode the chunks that left the last stage this tick: chunks {sid: (chunk, frames uint8,
        latents)} and timings."""
        t_recv = time.time()
        t0 = time.perf_counter()
        out = {}
        for sid in sessions:
            work = finished.get(sid)
            if work is None or sid not in self.decoders:
                continue
            latents = unpack(work.x, self.device)
            frames = self.decoders[sid].push(latents)[0]
            self.last[sid] = work.chunk
            out[sid] = (work.chunk, pack(frames), work.x)
        compute = time.perf_counter() - t0
        self.busy_s += compute
        return {"chunks": out, "compute_s": compute, "recv": t_recv, "end": time.time()}
