"""Deep Forcing's Participative Compression (spec §c.3): a Deep Sink cache that, instead of evicting the
oldest chunk when a new chunk would overflow the window, keeps the tokens the recent queries attend to.

On an overflowing call every token j of the augmented set (cached tokens + the new chunk's roped keys) is
scored by the RoPE'd queries of the last `recent_frames` frames' worth of calls (`win_q`, every call
appends its queries):

    sum:  s_j = 1/(√d·H) · Σ_i Σ_h ⟨q_ih, k_jh⟩        max:  s_j = max_i 1/(√d·H) · Σ_h ⟨q_ih, k_jh⟩

and the cache keeps, compacted to the front in their original order,

    [sink: first K frames] [top-C: best eligible candidates, token by token] [last R frames (new chunk incl.)]

— `budget_frames` frames' worth of tokens, C = budget − K − R frames. A token already chosen
`topc_max_reuse` times is no longer eligible. Keys are stored roped; after compression the sink is
rotated in time as in Deep Sink (sink start = call start − budget) and the top-C tokens are rotated
(token by token: they come from different frames) to the C frames just before the recent tail, whose
frames stay absolute. A per-slot frame table records every slot's nominal frame.

If fewer than C·S candidates are eligible (possible only when 2·budget > W + 1 + K + R), the missing
top-C slots become padding: zero K/V, excluded from attention by a mask and never selected, so the
frame counters stay whole frames while the reference's "keep fewer tokens" semantics are preserved.

All per-stream state is preallocated in `KVCache.state` (bounded; see `ParticipativeCompressionPolicy.
init_state`); the policy object only holds settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from ..models.attention import TokenGrid, attention
from ..models.rope import Rope3D
from .deep_sink import DeepSinkPolicy
from .kv import CallSpec, KVCache
from .window import WindowCall, WindowPlan, WindowSinkPolicy

FUSIONS = ("sum", "max")
_STATE_TENSORS = ("abs_frame_idx", "topc_select_counts", "valid_mask")


@dataclass(frozen=True)
class CompressionPlan(WindowPlan):
    """A `WindowPlan` plus what a compressing call does (identical for every layer)."""

    compress: bool = False
    prev_end: int = 0  # filled frames before the call (the augmented set is prev_end + num_frames frames)
    sink_start: int = 0  # nominal first frame of the sink after compression
    topc_start: int = 0  # nominal frame of the first top-C slot-frame after compression
    tail_start: int = 0  # absolute frame of the first recent (tail) frame after compression


def rotate_time(x: Tensor, delta: Tensor, rope: Rope3D) -> Tensor:
    """Copy of roped keys x [B, L, heads, head_dim] moved by `delta` [B, L] (integer frames, one per
    token) in time: only the temporal RoPE channels change (R(p + Δ) = R(Δ)·R(p)); float64 math."""
    if not bool((delta != 0).any()):
        return x
    pairs = rope.split[0]
    b, length, heads, _ = x.shape
    angles = delta.to(torch.float64)[..., None] * rope.freqs[0].to(x.device)  # [B, L, pairs]
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    z = torch.view_as_complex(x[..., : 2 * pairs].to(torch.float64).reshape(b, length, heads, pairs, 2).contiguous())
    out = x.clone()
    out[..., : 2 * pairs] = torch.view_as_real(z * rot).flatten(3).to(x.dtype)
    return out


def fused_scores(queries: Tensor, keys: Tensor, fusion: str = "sum", block: int = 4096) -> Tensor:
    """Participation score of every key: [B, Nq, H, D] queries, [B, T, H, D] keys -> float32 [B, T].

    Logits are summed over heads and scaled by 1/(√D·H); "sum" adds them over queries, "max" takes the
    largest over queries. Computed in float32 in key/query blocks (bounded transient memory).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    b, nq, heads, dim = queries.shape
    t = keys.shape[1]
    scale = 1.0 / (math.sqrt(dim) * heads)
    out = torch.empty(b, t, dtype=torch.float32, device=keys.device)
    q = queries.reshape(b, nq, heads * dim)
    q_sum = q.to(torch.float32).sum(dim=1) if fusion == "sum" else None  # [B, H·D]
    for k0 in range(0, t, block):
        k = keys[:, k0:k0 + block].reshape(b, -1, heads * dim).to(torch.float32)  # [B, t', H·D]
        if q_sum is not None:
            out[:, k0:k0 + k.shape[1]] = torch.einsum("btc,bc->bt", k, q_sum)
        else:
            best = torch.full((b, k.shape[1]), -math.inf, dtype=torch.float32, device=keys.device)
            for q0 in range(0, nq, 256):
                logits = torch.bmm(q[:, q0:q0 + 256].to(torch.float32), k.transpose(1, 2))  # [B, q', t']
                best = torch.maximum(best, logits.amax(dim=1))
            out[:, k0:k0 + k.shape[1]] = best
    return out.mul_(scale)


class CompressionCall(WindowCall):
    """Per layer: rope q/k at absolute frames, record the queries, then either compress (score the
    augmented set, keep sink ∪ top-C ∪ recent, re-rotate) or write the chunk's slots; attend."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        policy, cache, plan, rope = self.policy, self.cache, self.plan, self.rope
        s = cache.tokens_per_frame
        if grid.tokens_per_frame != s:
            raise ValueError(f"call has {grid.tokens_per_frame} tokens per frame, cache was built for {s}")
        k = policy.store_keys(k, plan, grid, rope)
        q, _ = policy.position(q, k, plan, grid, rope)
        policy.record_queries(cache, layer, q)
        if plan.compress:
            policy.compress_(cache, layer, plan, k, v, rope)
        else:
            lo, hi = plan.write_start * s, plan.end * s
            cache.k[layer][:, lo:hi] = k[:, plan.skip * s:]
            cache.v[layer][:, lo:hi] = v[:, plan.skip * s:]
            frames = torch.arange(plan.call.start_frame + plan.skip, plan.call.end_frame, device=k.device)
            st = cache.state
            st["abs_frame_idx"][layer][:, lo:hi] = frames.repeat_interleave(s)
            st["topc_select_counts"][layer][:, lo:hi] = 0
            st["valid_mask"][layer][:, lo:hi] = True
        n = plan.end * s
        keys, values = cache.k[layer][:, :n], cache.v[layer][:, :n]
        mask = None
        if cache.state["has_pads"][layer]:
            mask = cache.state["valid_mask"][layer][:, None, None, :n]  # [B, 1, 1, L] broadcast over heads, queries
        return attention(q, keys, values, mask=mask)


class ParticipativeCompressionPolicy(DeepSinkPolicy):
    """Deep Sink + Participative Compression (Deep Forcing, `self_forcing_dmd_sink10.yaml` defaults).

    capacity_frames W: cache window; sink_frames K: protected sink; budget_frames: frames kept after a
    compression (K + C + R); recent_frames R: frames of recent queries scored with and of newest tokens
    always kept; fusion: "sum" | "max" over recent queries; topc_max_reuse: times a token may be chosen
    as top-C (0 = no limit); keep_sinks: protect the first K frames (False: they compete as candidates,
    C = budget − R). Absolute RoPE positions elsewhere, so the stream is limited by the RoPE table like
    deep_sink (rope_overflow as in window_sink).
    """

    name = "deep_sink_pc"

    def __init__(self, capacity_frames: int = 21, sink_frames: int = 10, budget_frames: int = 16,
                 recent_frames: int = 4, fusion: str = "sum", topc_max_reuse: int = 7, keep_sinks: bool = True,
                 rope_overflow: str = "error") -> None:
        for label, value in (("capacity_frames", capacity_frames), ("sink_frames", sink_frames),
                             ("budget_frames", budget_frames), ("recent_frames", recent_frames),
                             ("topc_max_reuse", topc_max_reuse)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{label} must be an int, got {value!r}")
        if not isinstance(keep_sinks, bool):
            raise TypeError(f"keep_sinks must be a bool, got {keep_sinks!r}")
        super().__init__(capacity_frames, sink_frames, global_sink=True, rope_overflow=rope_overflow)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if recent_frames < 1:
            raise ValueError(f"recent_frames must be >= 1 (the recent window holds the new chunk), got {recent_frames}")
        if topc_max_reuse < 0:
            raise ValueError(f"topc_max_reuse must be >= 0 (0 = no limit), got {topc_max_reuse}")
        protected = sink_frames if keep_sinks else 0
        if not protected + recent_frames <= budget_frames <= capacity_frames:
            raise ValueError(
                f"budget_frames must satisfy {'sink_frames + ' if keep_sinks else ''}recent_frames <= budget_frames "
                f"<= capacity_frames, i.e. {protected + recent_frames} <= budget_frames <= {capacity_frames}; "
                f"got {budget_frames}")
        self.budget_frames = budget_frames
        self.recent_frames = recent_frames
        self.fusion = fusion
        self.topc_max_reuse = topc_max_reuse
        self.keep_sinks = keep_sinks

    @property
    def protected_frames(self) -> int:
        """Frames at the front that are never candidates (the sink when keep_sinks)."""
        return self.sink_frames if self.keep_sinks else 0

    @property
    def topc_frames(self) -> int:
        """C, in frames' worth of tokens."""
        return self.budget_frames - self.protected_frames - self.recent_frames

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "budget_frames": self.budget_frames, "recent_frames": self.recent_frames,
                "fusion": self.fusion, "topc_max_reuse": self.topc_max_reuse, "keep_sinks": self.keep_sinks}

    # --- state -------------------------------------------------------------------------------------
    def allocate(self, num_layers: int, batch: int, tokens_per_frame: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        cache = super().allocate(num_layers, batch, tokens_per_frame, heads, head_dim, dtype, device)
        self.init_state(cache)
        return cache

    def init_state(self, cache: KVCache) -> None:
        """Preallocate the per-stream bookkeeping in `cache.state` (fixed size for the stream's life):

        win_q[l]              [B, R·S, H, D]  recent roped queries of layer l, oldest first (win_q_len[l] filled)
        abs_frame_idx         [L, B, W·S]     nominal frame of every slot's key (-1 = empty / padding)
        topc_select_counts    [L, B, W·S]     times the slot's token was chosen as top-C
        valid_mask            [L, B, W·S]     False for padding slots (masked out of attention)
        has_pads[l]           whether layer l currently has padding slots
        sink_start_frame      nominal first frame of the sink; topc_start_frame, tail_start_frame: nominal
                              first top-C frame / first absolute frame after the last compression
        compressions          number of compressions so far
        """
        k0 = cache.k[0]
        b, slots, heads, dim = k0.shape
        layers, r = len(cache.k), self.recent_frames * cache.tokens_per_frame
        st = cache.state
        st["win_q"] = [torch.zeros(b, r, heads, dim, dtype=k0.dtype, device=k0.device) for _ in range(layers)]
        st["win_q_len"] = [0] * layers
        st["abs_frame_idx"] = torch.full((layers, b, slots), -1, dtype=torch.long, device=k0.device)
        st["topc_select_counts"] = torch.zeros((layers, b, slots), dtype=torch.int32, device=k0.device)
        st["valid_mask"] = torch.zeros((layers, b, slots), dtype=torch.bool, device=k0.device)
        st["has_pads"] = [False] * layers
        st["sink_start_frame"] = None
        st["topc_start_frame"] = None
        st["tail_start_frame"] = 0
        st["compressions"] = 0

    def _ensure_state(self, cache: KVCache) -> None:
        st = cache.state
        k0 = cache.k[0]
        want = (len(cache.k), k0.shape[0], k0.shape[1])
        ok = all(isinstance(st.get(key), Tensor) and tuple(st[key].shape) == want for key in _STATE_TENSORS)
        ok = ok and isinstance(st.get("win_q"), list) and len(st["win_q"]) == len(cache.k) \
            and st["win_q"][0].shape[1] == self.recent_frames * cache.tokens_per_frame
        if not ok:
            if cache.local_end or cache.global_end:
                raise ValueError("cache holds frames but no participative-compression state; allocate it with "
                                 "this policy (policy.allocate) or reset() it before the first call")
            self.init_state(cache)

    def prepare_recache(self, cache: KVCache) -> None:
        if cache.state.get("compressions"):
            raise NotImplementedError("prompt re-cache is not supported after participative compression "
                                      "(compressed frames cannot be recomputed)")
        super().prepare_recache(cache)

    # --- planning ----------------------------------------------------------------------------------
    def plan(self, cache: KVCache, call: CallSpec) -> CompressionPlan:
        n, cap = call.num_frames, cache.capacity_frames
        extends = call.end_frame > cache.global_end
        if extends and cache.local_end + n > cap:
            if call.start_frame != cache.global_end:
                raise ValueError(f"participative compression needs the overflowing call to start at the stream end "
                                 f"(frame {cache.global_end}), got {call}")
            if n > self.recent_frames:
                raise ValueError(f"a {n}-frame call does not fit in the recent window of recent_frames="
                                 f"{self.recent_frames}; use recent_frames >= the chunk size")
            budget, r = self.budget_frames, self.recent_frames
            tail = call.end_frame - r
            return CompressionPlan(call, evict=0, write_start=budget - n, skip=0, end=budget, compress=True,
                                   prev_end=cache.local_end, sink_start=call.start_frame - budget,
                                   topc_start=tail - self.topc_frames, tail_start=tail)
        if not extends and call.start_frame < cache.state.get("tail_start_frame", 0):
            raise ValueError(f"call {call} recomputes frames before frame {cache.state['tail_start_frame']}, "
                             "which participative compression has compacted; only the frames after the last "
                             "compression can be recomputed")
        base = WindowSinkPolicy.plan(self, cache, call)
        return CompressionPlan(**{f.name: getattr(base, f.name) for f in fields(WindowPlan)})

    def begin(self, cache: KVCache, call: CallSpec, rope: Rope3D) -> CompressionCall:
        self._ensure_state(cache)
        ctx = WindowSinkPolicy.begin(self, cache, call, rope)  # plan + counters (no Deep Sink eviction path)
        plan = ctx.plan
        st = cache.state
        if plan.compress:
            if self.protected_frames:
                old = int(st["abs_frame_idx"][0, 0, 0]) if st["sink_start_frame"] is None else st["sink_start_frame"]
                plan = replace(plan, sink_shift=plan.sink_start - old)
                st["sink_start_frame"] = plan.sink_start
            st["topc_start_frame"] = plan.topc_start
            st["tail_start_frame"] = plan.tail_start
            st["compressions"] += 1
        return CompressionCall(self, cache, plan, rope)

    # --- per-layer work ----------------------------------------------------------------------------
    def record_queries(self, cache: KVCache, layer: int, q: Tensor) -> None:
        """Append a call's roped queries to layer `layer`'s window, keeping only the last R·S tokens."""
        buf = cache.state["win_q"][layer]
        cap, n = buf.shape[1], q.shape[1]
        if n >= cap:
            buf.copy_(q[:, n - cap:])
            cache.state["win_q_len"][layer] = cap
            return
        filled = cache.state["win_q_len"][layer]
        if filled + n > cap:  # drop the oldest
            drop = filled + n - cap
            buf[:, : filled - drop] = buf[:, drop:filled].clone()
            filled -= drop
        buf[:, filled:filled + n] = q
        cache.state["win_q_len"][layer] = filled + n

    def compress_(self, cache: KVCache, layer: int, plan: CompressionPlan, k: Tensor, v: Tensor, rope: Rope3D) -> None:
        """Score cache + new chunk, keep sink ∪ top-C ∪ recent at the front, re-rotate sink and top-C."""
        st, s = cache.state, cache.tokens_per_frame
        kbuf, vbuf = cache.k[layer], cache.v[layer]
        b, dev = kbuf.shape[0], kbuf.device
        old, n_new = plan.prev_end * s, k.shape[1]
        total = old + n_new
        sink, top_c, recent = self.protected_frames * s, self.topc_frames * s, self.recent_frames * s
        budget = self.budget_frames * s

        aug_k = torch.cat([kbuf[:, :old], k.to(kbuf.dtype)], dim=1)
        aug_v = torch.cat([vbuf[:, :old], v.to(vbuf.dtype)], dim=1)
        new_frames = torch.arange(plan.call.start_frame, plan.call.end_frame, device=dev).repeat_interleave(s)
        aug_abs = torch.cat([st["abs_frame_idx"][layer][:, :old], new_frames.expand(b, -1)], dim=1)
        aug_cnt = torch.cat([st["topc_select_counts"][layer][:, :old],
                             torch.zeros(b, n_new, dtype=torch.int32, device=dev)], dim=1)
        aug_valid = torch.cat([st["valid_mask"][layer][:, :old], torch.ones(b, n_new, dtype=torch.bool, device=dev)], dim=1)

        # top-C among eligible candidates [sink, total - recent), per token, per batch element
        lo, hi = sink, total - recent
        if top_c > 0:
            eligible = aug_valid[:, lo:hi].clone()
            if self.topc_max_reuse > 0:
                eligible &= aug_cnt[:, lo:hi] < self.topc_max_reuse
            wq = st["win_q"][layer][:, : st["win_q_len"][layer]]
            scores = fused_scores(wq, aug_k[:, lo:hi], self.fusion)
            scores = scores.masked_fill(~eligible, -math.inf)
            best, pick = torch.topk(scores, k=top_c, dim=1)
            chosen = torch.isfinite(best)  # False: fewer eligible candidates than C (padding)
            order = torch.where(chosen, pick + lo, torch.full_like(pick, -1))
            order = torch.sort(order, dim=1).values  # padding (-1) first, then chosen tokens in original order
            is_pad = order < 0
            order = order.clamp_min(0)
        else:
            order = torch.zeros(b, 0, dtype=torch.long, device=dev)
            is_pad = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        idx = torch.cat([torch.arange(sink, device=dev).expand(b, -1), order,
                         torch.arange(total - recent, total, device=dev).expand(b, -1)], dim=1)  # [B, budget]
        pad = torch.cat([torch.zeros(b, sink, dtype=torch.bool, device=dev), is_pad,
                         torch.zeros(b, recent, dtype=torch.bool, device=dev)], dim=1)

        # nominal frames per slot: sink moved (Deep Sink), top-C just before the tail, tail absolute
        slot_frame = torch.arange(budget, device=dev) // s
        nominal = torch.cat([plan.sink_start + slot_frame[:sink],
                             plan.topc_start + slot_frame[sink:sink + top_c] - self.protected_frames,
                             plan.tail_start + slot_frame[sink + top_c:] - self.protected_frames - self.topc_frames])
        gather = idx[:, :, None, None].expand(-1, -1, *aug_k.shape[2:])
        kept_k, kept_v = aug_k.gather(1, gather), aug_v.gather(1, gather)
        kept_abs = aug_abs.gather(1, idx)
        delta = torch.where(pad, 0, nominal[None] - kept_abs)
        kept_k = rotate_time(kept_k, delta, rope)
        keep = ~pad
        kept_k = kept_k * keep[:, :, None, None]
        kept_v = kept_v * keep[:, :, None, None]
        counts = aug_cnt.gather(1, idx)
        counts[:, sink:sink + top_c] += 1
        counts = counts * keep

        kbuf[:, :budget], vbuf[:, :budget] = kept_k, kept_v
        kbuf[:, budget:], vbuf[:, budget:] = 0, 0
        st["abs_frame_idx"][layer][:, :budget] = torch.where(keep, nominal[None], -1)
        st["abs_frame_idx"][layer][:, budget:] = -1
        st["topc_select_counts"][layer][:, :budget] = counts
        st["topc_select_counts"][layer][:, budget:] = 0
        st["valid_mask"][layer][:, :budget] = keep
        st["valid_mask"][layer][:, budget:] = False
        st["has_pads"][layer] = bool(pad.any())
