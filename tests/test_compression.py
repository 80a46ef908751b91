"""Deep Forcing's Participative Compression policy (`deep_sink_pc`, spec §c.3) on the tiny fixture DiT.

Streams are driven like `streamgen/parity/chunked.py` (4 warped steps + clean rerun per 3-frame chunk) with
seeded random noise. A recording wrapper captures every call's un-roped q/k/v per layer; an independent
shadow model written here (python token lists, float64 scores, `rope.apply` on captured un-roped keys)
replays the spec and predicts, after every chunk, which token sits in which slot at which nominal frame.
The tests compare the policy's cache against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor

from streamgen.cache.compression import ParticipativeCompressionPolicy
from streamgen.cache.kv import CallSpec, KVCache
from streamgen.cache.policy import CachePolicy, make_policy
from streamgen.models.attention import SelfAttentionContext
from streamgen.parity.common import Fixture
from streamgen.sampling.denoiser import Denoiser
from streamgen.sampling.few_step import FewStepSampler
from streamgen.sampling.schedule import FlowSchedule

FIXTURE = Path(__file__).parent / "fixtures" / "deep_forcing"
CHUNK = 3  # latent frames per chunk
LATENT = 8  # latent H = W of the fixture
S = 16  # tokens per latent frame (8×8 latents, 2×2 patches → a 4×4 token grid)
GRID = (4, 4)

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def model():
    return Fixture.open(FIXTURE).build_model()


# --- driving a stream ----------------------------------------------------------------------------------
class Recorder(SelfAttentionContext):
    def __init__(self, inner: SelfAttentionContext, log: list, call: CallSpec) -> None:
        self.inner, self.log, self.call = inner, log, call

    def __call__(self, layer, q, k, v, grid):
        self.log.append((self.call, layer, q.clone(), k.clone(), v.clone()))
        return self.inner(layer, q, k, v, grid)


class RecordingPC(ParticipativeCompressionPolicy):
    """Test-only: wraps each call's context to capture the un-roped q/k/v the DiT hands to the policy."""

    def __init__(self, log: list, **settings) -> None:
        super().__init__(**settings)
        self.log = log

    def begin(self, cache, call, rope):
        return Recorder(super().begin(cache, call, rope), self.log, call)


def state_bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


def state_ptrs(value) -> list[int]:
    if isinstance(value, Tensor):
        return [value.data_ptr()]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in state_ptrs(v)]
    return []


def deep_copy(cache: KVCache) -> KVCache:
    def copy(value):
        if isinstance(value, Tensor):
            return value.clone()
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value

    return KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v], cache.tokens_per_frame,
                   cache.global_end, cache.local_end, {k: copy(v) for k, v in cache.state.items()})


@dataclass
class Run:
    outputs: list[Tensor]
    snapshots: list[dict]  # per chunk, after its rerun
    logs: list[list]  # per chunk: (call, layer, q, k, v) un-roped
    cache: KVCache
    denoiser: Denoiser
    cross: list


def drive(model, policy: CachePolicy, chunks: int, seed: int = 0, log: list | None = None) -> Run:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    schedule = FlowSchedule(5.0)
    sampler = FewStepSampler(schedule, schedule.step_list([1000, 750, 500, 250]))
    denoiser = Denoiser(model, policy)
    cross = model.cross_kv(torch.randn(1, cfg.text_len, cfg.text_dim, generator=g))
    cache = policy.allocate(cfg.num_layers, 1, S, cfg.num_heads, cfg.head_dim)
    shape = (1, CHUNK, cfg.in_dim, LATENT, LATENT)
    run = Run([], [], [], cache, denoiser, cross)
    for j in range(chunks):
        mark = len(log) if log is not None else 0
        noise = torch.randn(shape, generator=g)
        x0 = sampler.sample(lambda x, t, call: denoiser.one(x, t, cross, cache, call), noise, CHUNK * j,
                            lambda k: torch.randn(shape, generator=g))
        run.outputs.append(x0)
        st = cache.state
        run.snapshots.append({
            "k": [t.clone() for t in cache.k], "v": [t.clone() for t in cache.v],
            "global_end": cache.global_end, "local_end": cache.local_end,
            "abs": st.get("abs_frame_idx", torch.empty(0)).clone(),
            "counts": st.get("topc_select_counts", torch.empty(0)).clone(),
            "valid": st.get("valid_mask", torch.empty(0)).clone(),
            "sink_start": st.get("sink_start_frame"), "compressions": st.get("compressions"),
            "bytes": cache.nbytes + sum(state_bytes(v) for v in st.values()),
            "ptrs": [t.data_ptr() for t in (*cache.k, *cache.v)] + [p for v in st.values() for p in state_ptrs(v)],
        })
        if log is not None:
            run.logs.append(log[mark:])
    return run


# --- the independent shadow model ----------------------------------------------------------------------
@dataclass
class Settings:
    W: int = 21
    K: int = 10
    budget: int = 16
    R: int = 4
    fusion: str = "sum"
    cap: int = 7
    keep_sinks: bool = True

    def policy_kwargs(self) -> dict:
        return dict(capacity_frames=self.W, sink_frames=self.K, budget_frames=self.budget, recent_frames=self.R,
                    fusion=self.fusion, topc_max_reuse=self.cap, keep_sinks=self.keep_sinks)


@dataclass
class LayerShadow:
    ids: list = field(default_factory=list)  # token id (frame·S + pos) per slot, None = padding
    nominal: list = field(default_factory=list)  # nominal RoPE frame per slot
    counts: dict = field(default_factory=dict)  # id -> times chosen as top-C
    win_q: Tensor | None = None
    global_end: int = 0


class Shadow:
    """Replays the spec from captured un-roped tensors, one layer at a time."""

    def __init__(self, st: Settings, model, max_frames: int = 400) -> None:
        self.st, self.rope, cfg = st, model.rope, model.cfg
        self.S, (self.h, self.w) = S, GRID
        self.heads, self.dim = cfg.num_heads, cfg.head_dim
        self.Ks = st.K if st.keep_sinks else 0
        self.C = st.budget - self.Ks - st.R
        self.layers = [LayerShadow() for _ in range(cfg.num_layers)]
        self.uk = torch.zeros(cfg.num_layers, max_frames, self.S, self.heads, self.dim)
        self.uv = torch.zeros_like(self.uk)
        self.records: list[dict] = []

    def rope_tokens(self, layer: int, ids: list, nominal: list) -> Tensor:
        """Keys [M, H, D] of tokens `ids` (un-roped, last written) roped at (nominal frame, own h, w) with
        rope.apply: each token is placed alone in a virtual frame at its spatial position."""
        m = len(ids)
        out = torch.zeros(m, self.heads, self.dim)
        real = [i for i, t in enumerate(ids) if t is not None]
        if not real:
            return out
        tid = torch.tensor([ids[i] for i in real])
        f, p = tid // self.S, tid % self.S
        x = torch.zeros(len(real), self.S, self.heads, self.dim)
        x[torch.arange(len(real)), p] = self.uk[layer, f, p]
        y = self.rope.apply(x.reshape(1, -1, self.heads, self.dim), [nominal[i] for i in real], self.h, self.w)
        out[torch.tensor(real)] = y.reshape(len(real), self.S, self.heads, self.dim)[torch.arange(len(real)), p]
        return out

    def scores(self, win_q: Tensor, keys: Tensor) -> Tensor:
        logits = torch.einsum("ihd,jhd->ij", win_q.double(), keys.double()) / (math.sqrt(self.dim) * self.heads)
        return logits.sum(0) if self.st.fusion == "sum" else logits.max(0).values

    def call(self, chunk: int, call: CallSpec, layer: int, q: Tensor, k: Tensor, v: Tensor) -> None:
        st, S, L = self.st, self.S, self.layers[layer]
        frames = range(call.start_frame, call.end_frame)
        qr = self.rope.apply(q, frames, self.h, self.w)[0]
        L.win_q = qr if L.win_q is None else torch.cat([L.win_q, qr])
        L.win_q = L.win_q[-st.R * S:]
        self.uk[layer, call.start_frame:call.end_frame] = k[0].reshape(call.num_frames, S, self.heads, self.dim)
        self.uv[layer, call.start_frame:call.end_frame] = v[0].reshape(call.num_frames, S, self.heads, self.dim)
        new_ids = [f * S + p for f in frames for p in range(S)]
        new_nom = [f for f in frames for _ in range(S)]
        local = len(L.ids) // S
        extends = call.end_frame > L.global_end
        if extends and local + call.num_frames > st.W:
            self.compress(chunk, call, layer, L, new_ids, new_nom)
        else:
            end = local + (call.end_frame - L.global_end if extends else 0)
            L.ids += [None] * ((end - local) * S)
            L.nominal += [None] * ((end - local) * S)
            lo = (end - call.num_frames) * S
            L.ids[lo:end * S], L.nominal[lo:end * S] = new_ids, new_nom
        L.global_end = max(L.global_end, call.end_frame)

    def compress(self, chunk, call, layer, L, new_ids, new_nom) -> None:
        st, S = self.st, self.S
        ids, nom = L.ids + new_ids, L.nominal + new_nom
        total = len(ids)
        scores = self.scores(L.win_q, self.rope_tokens(layer, ids, nom))
        cand = [i for i in range(self.Ks * S, total - st.R * S) if ids[i] is not None]
        eligible = [i for i in cand if st.cap == 0 or L.counts.get(ids[i], 0) < st.cap]
        ranked = sorted(eligible, key=lambda i: -float(scores[i]))
        chosen, rest = ranked[: self.C * S], ranked[self.C * S:]
        uncapped = set(sorted(cand, key=lambda i: -float(scores[i]))[: self.C * S])
        self.records.append({
            "chunk": chunk, "layer": layer, "ids": [ids[i] for i in sorted(chosen)],
            "min_chosen": min((float(scores[i]) for i in chosen), default=math.inf),
            "max_rest": max((float(scores[i]) for i in rest), default=-math.inf),
            "capped": {ids[i] for i in cand if st.cap and L.counts.get(ids[i], 0) >= st.cap},
            "cap_binding": uncapped != set(chosen), "pads": self.C * S - len(chosen),
            "counts_before": {ids[i]: L.counts.get(ids[i], 0) for i in chosen},
        })
        for i in chosen:
            L.counts[ids[i]] = L.counts.get(ids[i], 0) + 1
        L.ids = (ids[: self.Ks * S] + [None] * (self.C * S - len(chosen)) + [ids[i] for i in sorted(chosen)]
                 + ids[total - st.R * S:])
        sink0, topc0, tail0 = call.start_frame - st.budget, call.end_frame - st.R - self.C, call.end_frame - st.R
        L.nominal = []
        for f in range(st.budget):
            n = sink0 + f if f < self.Ks else topc0 + f - self.Ks if f < self.Ks + self.C else tail0 + f - self.Ks - self.C
            L.nominal += [n] * S

    def expected(self, layer: int) -> dict:
        L = self.layers[layer]
        keys = self.rope_tokens(layer, L.ids, L.nominal)
        values = torch.zeros_like(keys)
        for i, t in enumerate(L.ids):
            if t is not None:
                values[i] = self.uv[layer, t // self.S, t % self.S]
        return {"ids": list(L.ids), "keys": keys, "values": values,
                "abs": torch.tensor([-1 if t is None else n for t, n in zip(L.ids, L.nominal)]),
                "counts": torch.tensor([0 if t is None else L.counts.get(t, 0) for t in L.ids]),
                "valid": torch.tensor([t is not None for t in L.ids])}


@dataclass
class Checked:
    run: Run
    shadow: Shadow
    settings: Settings
    key_err: list = field(default_factory=list)  # (chunk, layer, max |Δ| of keys vs rope.apply at nominal)
    mismatches: list = field(default_factory=list)  # (chunk, layer, what)


def run_checked(model, st: Settings, chunks: int, seed: int = 0) -> Checked:
    log: list = []
    run = drive(model, RecordingPC(log, **st.policy_kwargs()), chunks, seed, log)
    shadow = Shadow(st, model)
    out = Checked(run, shadow, st)
    for j, (entries, snap) in enumerate(zip(run.logs, run.snapshots)):
        for call, layer, q, k, v in entries:
            shadow.call(j, call, layer, q, k, v)
        for layer in range(model.cfg.num_layers):
            exp = shadow.expected(layer)
            n = len(exp["ids"])
            if snap["local_end"] * S != n:
                out.mismatches.append((j, layer, f"local_end {snap['local_end']} vs {n // S}"))
                continue
            out.key_err.append((j, layer, (snap["k"][layer][0, :n] - exp["keys"]).abs().max().item()))
            if not torch.equal(snap["v"][layer][0, :n], exp["values"]):
                out.mismatches.append((j, layer, "values (token identity)"))
            if not torch.equal(snap["abs"][layer, 0, :n], exp["abs"]):
                out.mismatches.append((j, layer, "abs_frame_idx"))
            if not torch.equal(snap["counts"][layer, 0, :n].long(), exp["counts"]):
                out.mismatches.append((j, layer, "topc_select_counts"))
            if not torch.equal(snap["valid"][layer, 0, :n], exp["valid"]):
                out.mismatches.append((j, layer, "valid_mask"))
    return out


@pytest.fixture(scope="module")
def default_run(model) -> Checked:
    """Real Deep Forcing PC settings (W 21, K 10, budget 16, R 4, sum, reuse 7) for 62 chunks."""
    return run_checked(model, Settings(), chunks=62)


# --- (1) bounded memory and the compression schedule ----------------------------------------------------
def expected_compressions(st: Settings, chunks: int) -> list[int]:
    local, out = 0, []
    for j in range(chunks):
        if local + CHUNK > st.W:
            out.append(j)
            local = st.budget
        else:
            local += CHUNK
    return out


def test_memory_bounded_and_compression_schedule(default_run):
    snaps, st = default_run.run.snapshots, default_run.settings
    assert len(snaps) >= 60
    assert len({s["bytes"] for s in snaps}) == 1, "cache + state memory changed over the stream"
    assert all(s["ptrs"] == snaps[0]["ptrs"] for s in snaps), "cache/state tensors were reallocated"
    assert all(s["local_end"] <= st.W and s["global_end"] == CHUNK * (j + 1) for j, s in enumerate(snaps))
    seen = [j for j, s in enumerate(snaps) if s["compressions"] != (snaps[j - 1]["compressions"] if j else 0)]
    expected = expected_compressions(st, len(snaps))
    assert expected[:3] == [7, 9, 11]  # 21 + 3 > 21, then 16 → 19 → 22 > 21 every second chunk
    assert seen == expected
    assert [s["local_end"] for s in snaps[6:12]] == [21, 16, 19, 16, 19, 16]
    assert snaps[-1]["compressions"] == len(expected)


# --- (2) the sink ---------------------------------------------------------------------------------------
def test_sink_kept_and_only_rerotated(default_run, model):
    snaps, st = default_run.run.snapshots, default_run.settings
    sink = st.K * S
    first = expected_compressions(st, len(snaps))[0]
    original = snaps[first - 1]  # sink complete, nothing moved yet
    assert original["sink_start"] is None
    assert snaps[first]["sink_start"] == CHUNK * first - st.budget == 5  # first compression: Δ = 21 − 16
    for j in range(first, len(snaps)):
        snap = snaps[j]
        delta = snap["sink_start"]
        assert delta == CHUNK * max(c for c in expected_compressions(st, j + 1)) - st.budget
        for layer in range(model.cfg.num_layers):
            assert torch.equal(snap["v"][layer][:, :sink], original["v"][layer][:, :sink]), f"sink values changed (chunk {j})"
            back = snap["k"][layer][:, :sink].clone()
            model.rope.shift_time_(back, -delta)
            err = (back - original["k"][layer][:, :sink]).abs().max().item()
            assert err < 1e-5, f"chunk {j} layer {layer}: un-rotated sink keys differ by {err}"
            assert (snap["k"][layer][:, :sink] - original["k"][layer][:, :sink]).abs().max() > 1e-2  # really moved
            assert torch.equal(snap["abs"][layer, 0, :sink], delta + torch.arange(sink) // S)


# --- (3) top-C selection, (5) RoPE compensation: the cache equals the shadow's prediction -----------------
def test_topc_are_top_scoring_eligible_candidates(default_run):
    st = default_run.settings
    assert not default_run.mismatches, default_run.mismatches[:5]
    records = default_run.shadow.records
    assert len(records) == 2 * len(expected_compressions(st, len(default_run.run.snapshots)))
    c_tokens = (st.budget - st.K - st.R) * S
    for rec in records:
        assert len(rec["ids"]) == c_tokens and rec["pads"] == 0
        assert rec["min_chosen"] >= rec["max_rest"]
    # the selection matters: the policy's top-C slots hold exactly the shadow's choice (values are never rotated)
    for rec in records:
        snap = default_run.run.snapshots[rec["chunk"]]
        got = snap["v"][rec["layer"]][0, st.K * S: st.K * S + c_tokens]
        want = torch.stack([default_run.shadow.uv[rec["layer"], t // S, t % S] for t in rec["ids"]])
        assert torch.equal(got, want), f"chunk {rec['chunk']} layer {rec['layer']}: wrong top-C tokens"
    # not trivially "the most recent candidates": selections reach back over the stream
    frames = {t // S for rec in records for t in rec["ids"]}
    assert min(frames) < 10 + 3 and len(frames) > 10


def test_topc_rope_compensation(default_run):
    st = default_run.settings
    worst = max(err for _, _, err in default_run.key_err)
    assert worst < 1e-5, f"kept keys differ from rope.apply(un-roped key, nominal frame) by {worst}"
    c = st.budget - st.K - st.R
    for j, snap in enumerate(default_run.run.snapshots):
        if snap["compressions"] and snap["local_end"] == st.budget:  # right after a compression
            end = CHUNK * (j + 1)
            topc = snap["abs"][:, 0, st.K * S:(st.K + c) * S]
            assert torch.equal(topc, (end - st.R - c + torch.arange(c * S) // S).expand_as(topc))
            tail = snap["abs"][:, 0, (st.K + c) * S: st.budget * S]
            assert torch.equal(tail, (end - st.R + torch.arange(st.R * S) // S).expand_as(tail))


# --- (4) reuse cap --------------------------------------------------------------------------------------
def test_reuse_cap(default_run):
    st, records = default_run.settings, default_run.shadow.records
    assert not default_run.mismatches, default_run.mismatches[:5]
    assert any(rec["capped"] for rec in records), "no token reached the cap; the test would be vacuous"
    assert any(rec["cap_binding"] for rec in records), "the cap never changed a selection"
    for rec in records:
        assert all(n < st.cap for n in rec["counts_before"].values())
        assert not set(rec["ids"]) & rec["capped"]
    for snap in default_run.run.snapshots:
        assert int(snap["counts"].max()) <= st.cap


# --- other settings: max fusion with padding, no protected sink -----------------------------------------
def test_max_fusion_with_padding(model):
    st = Settings(W=12, K=2, budget=10, R=4, fusion="max", cap=1)  # 2·budget > W + 1 + K + R: shortfalls
    checked = run_checked(model, st, chunks=14)
    assert not checked.mismatches, checked.mismatches[:5]
    assert max(err for _, _, err in checked.key_err) < 1e-5
    assert any(rec["pads"] for rec in checked.shadow.records)
    for rec in checked.shadow.records:
        assert rec["min_chosen"] >= rec["max_rest"] and not set(rec["ids"]) & rec["capped"]
    assert all(torch.isfinite(x).all() for x in checked.run.outputs)

    # padding slots are masked out: garbage in them does not change attention
    run, last = checked.run, CHUNK * 13
    cache = run.cache
    assert cache.state["has_pads"][0]
    x = run.outputs[-1]
    t = torch.zeros(1, CHUNK)
    outs = []
    for garbage in (False, True):
        c = deep_copy(cache)
        if garbage:
            for layer in range(len(c.k)):
                pad = ~c.state["valid_mask"][layer][0, : c.local_end * S]
                assert pad.any()
                c.k[layer][0, : c.local_end * S][pad] = 100.0
                c.v[layer][0, : c.local_end * S][pad] = -100.0
        outs.append(run.denoiser.one(x, t, run.cross, c, CallSpec(last, CHUNK, "rerun")))
    assert torch.allclose(outs[0], outs[1], atol=1e-6, rtol=0)


def test_without_protected_sink(model):
    st = Settings(W=15, K=3, budget=9, R=4, fusion="sum", cap=3, keep_sinks=False)
    checked = run_checked(model, st, chunks=16)
    assert not checked.mismatches, checked.mismatches[:5]
    assert max(err for _, _, err in checked.key_err) < 1e-5
    assert checked.shadow.records and all(len(r["ids"]) == 5 * S for r in checked.shadow.records)
    # frames 0..K-1 are ordinary candidates: some are dropped
    first = set(range(3 * S))
    assert not first <= set(checked.shadow.layers[0].ids)


# --- (6) finite, deterministic; identical to Deep Sink until the first overflow --------------------------
def test_deterministic_and_finite(model):
    a = drive(model, ParticipativeCompressionPolicy(), chunks=12, seed=3)
    b = drive(model, ParticipativeCompressionPolicy(), chunks=12, seed=3)
    c = drive(model, ParticipativeCompressionPolicy(), chunks=12, seed=4)
    assert all(torch.isfinite(x).all() for x in a.outputs)
    assert all(torch.equal(x, y) for x, y in zip(a.outputs, b.outputs))
    assert not torch.equal(a.outputs[-1], c.outputs[-1])
    ds = drive(model, make_policy("deep_sink", capacity_frames=21, sink_frames=10), chunks=8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.outputs[:7], ds.outputs[:7]))
    assert not torch.allclose(a.outputs[7], ds.outputs[7], atol=1e-4)


# --- (7) settings and misuse ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(budget_frames=22), ValueError, "budget_frames"),
    (dict(budget_frames=13), ValueError, "budget_frames"),  # K + R = 14 > 13
    (dict(recent_frames=0), ValueError, "recent_frames"),
    (dict(fusion="mean"), ValueError, "fusion"),
    (dict(topc_max_reuse=-1), ValueError, "topc_max_reuse"),
    (dict(sink_frames=21), ValueError, "sink_frames"),
    (dict(capacity_frames=0), ValueError, "capacity_frames"),
    (dict(budget_frames=16.0), TypeError, "budget_frames"),
    (dict(keep_sinks="yes"), TypeError, "keep_sinks"),
])
def test_invalid_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        ParticipativeCompressionPolicy(**kwargs)


def test_registry_and_misuse(model):
    policy = make_policy("deep_sink_pc", capacity_frames=21, sink_frames=10, budget_frames=16, recent_frames=4)
    assert isinstance(policy, ParticipativeCompressionPolicy) and policy.name == "deep_sink_pc"
    assert policy.settings() == {"policy": "deep_sink_pc", "capacity_frames": 21, "sink_frames": 10,
                                 "global_sink": True, "rope_overflow": "error", "rope": "absolute", "budget_frames": 16,
                                 "recent_frames": 4, "fusion": "sum", "topc_max_reuse": 7, "keep_sinks": True}
    # budget 14 = K + R: no top-C (sink + recent only) is allowed
    ParticipativeCompressionPolicy(budget_frames=14)

    # a chunk larger than the recent window cannot be kept whole
    with pytest.raises(ValueError, match="recent_frames"):
        drive(model, ParticipativeCompressionPolicy(capacity_frames=6, sink_frames=1, budget_frames=4, recent_frames=2), chunks=3)

    # after a compression, compacted frames cannot be recomputed (prompt re-cache)
    run = drive(model, ParticipativeCompressionPolicy(capacity_frames=9, sink_frames=2, budget_frames=7), chunks=4)
    assert run.cache.state["compressions"] == 1
    with pytest.raises(NotImplementedError, match="re-cache"):
        run.denoiser.policy.prepare_recache(run.cache)
    x = torch.zeros(1, 9, 16, LATENT, LATENT)
    with pytest.raises(ValueError, match="compacted"):
        run.denoiser.one(x, torch.zeros(1, 9), run.cross, run.cache, CallSpec(3, 9, "recache"))

    # reset() clears the state; the policy re-creates it on the next call
    cache = run.cache
    cache.reset()
    out = run.denoiser.one(torch.zeros(1, 3, 16, LATENT, LATENT), torch.zeros(1, 3), run.cross, cache, CallSpec(0, 3))
    assert torch.isfinite(out).all() and cache.state["win_q_len"] == [3 * S, 3 * S]


def test_fused_scores_formula():
    from streamgen.cache.compression import fused_scores

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 7, 3, 8, generator=g), torch.randn(2, 5, 3, 8, generator=g)
    logits = torch.einsum("bihd,bjhd->bij", q.double(), k.double()) / (math.sqrt(8) * 3)  # summed over heads
    assert torch.allclose(fused_scores(q, k, "sum").double(), logits.sum(1), atol=1e-5)
    assert torch.allclose(fused_scores(q, k, "max").double(), logits.max(1).values, atol=1e-5)
    assert torch.allclose(fused_scores(q, k, "max", block=2).double(), logits.max(1).values, atol=1e-5)
