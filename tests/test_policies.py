"""Invariants of every KV-cache policy (spec §b.5, §c.1–c.4, §d).

Most tests drive a policy directly with synthetic per-frame K/V (fast, exact bookkeeping): every frame f
has a fixed pseudo-random un-roped key `raw_k(f, layer)` and a value equal to f on every channel (plus a
marker offset for noisy calls), so the values in a slot say which absolute frame sits there. The
prompt re-cache tests run the real tiny DiT through a `Stream`.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from streamgen.cache.kv import CallSpec, KVCache
from streamgen.cache.policy import CacheFullError, CachePolicy, make_policy
from streamgen.engine.prompts import Transition
from streamgen.engine.stream import Stream, StreamConfig
from streamgen.models.attention import TokenGrid, attention
from streamgen.models.rope import Rope3D

H, W = 2, 2  # token grid per frame
S = H * W  # tokens per frame
HEADS, HEAD_DIM = 2, 12  # RoPE split (2, 2, 2) complex pairs -> 4 temporal real channels
LAYERS = 2
CHUNK = 3
NOISY = 0.25  # value offset of "denoise" calls; the clean rerun writes exact frame indices

pytestmark = pytest.mark.usefixtures("one_thread")


# --- synthetic driver ------------------------------------------------------------------------------
def raw_k(frames: range | list[int], layer: int) -> Tensor:
    """Un-roped keys [1, len(frames)·S, HEADS, HEAD_DIM], a fixed function of (frame, layer)."""
    parts = [torch.randn(1, S, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(100_003 * layer + f))
             for f in frames]
    return torch.cat(parts, dim=1)


def frame_v(frames: range | list[int], offset: float = 0.0) -> Tensor:
    col = torch.tensor([float(f) + offset for f in frames]).repeat_interleave(S)
    return col[None, :, None, None].expand(1, len(col), HEADS, HEAD_DIM).clone()


def call(policy: CachePolicy, cache: KVCache, rope: Rope3D, start: int, n: int, role: str = "denoise",
         offset: float | None = None, q: Tensor | None = None) -> list[Tensor]:
    """One DiT call as the model makes it: begin once, then every layer in order. Returns per-layer outputs."""
    offset = (NOISY if role == "denoise" else 0.0) if offset is None else offset
    frames = range(start, start + n)
    ctx = policy.begin(cache, CallSpec(start, n, role), rope)
    q = torch.zeros(1, n * S, HEADS, HEAD_DIM) if q is None else q
    return [ctx(layer, q, raw_k(frames, layer), frame_v(frames, offset), TokenGrid(n, H, W)) for layer in range(LAYERS)]


def chunk(policy: CachePolicy, cache: KVCache, rope: Rope3D, j: int, steps: int = 2) -> list[Tensor]:
    """Chunk j the way the exact sampler runs it: `steps` noisy denoise calls, then the clean rerun."""
    for _ in range(steps):
        call(policy, cache, rope, j * CHUNK, CHUNK, "denoise")
    return call(policy, cache, rope, j * CHUNK, CHUNK, "rerun")


def slot_values(cache: KVCache, layer: int = 0, upto: int | None = None) -> list[float]:
    """Value of each slot [0, upto) (default local_end); asserts every token/channel of a slot agrees."""
    upto = cache.local_end if upto is None else upto
    v = cache.v[layer][0, : upto * S].reshape(upto, S * HEADS * HEAD_DIM)
    assert torch.equal(v, v[:, :1].expand_as(v)), "a slot holds mixed frames"
    return v[:, 0].tolist()


def expected_slots(end: int, cap: int, sink: int) -> list[int]:
    """Window + sink content after frames [0, end): the sink, then the most recent frames in order."""
    if end <= cap:
        return list(range(end))
    return list(range(sink)) + list(range(end - (cap - sink), end))


def new(name: str, **settings) -> tuple[CachePolicy, KVCache]:
    policy = make_policy(name, **settings)
    return policy, policy.allocate(LAYERS, 1, S, HEADS, HEAD_DIM)




@pytest.fixture
def rope() -> Rope3D:
    return Rope3D(HEAD_DIM, max_frames=1024)


# --- 1. eviction order (window_sink) ----------------------------------------------------------------
@pytest.mark.parametrize("cap,sink", [(12, 3), (10, 2), (9, 0)])
def test_window_sink_eviction_order(rope, cap, sink) -> None:
    """Sink = first frames forever, then the most recent frames in order; attention spans exactly them."""
    policy, cache = new("window_sink", capacity_frames=cap, sink_frames=sink)
    for j in range(12):
        out = chunk(policy, cache, rope, j)
        end = (j + 1) * CHUNK
        want = expected_slots(end, cap, sink)
        assert cache.global_end == end and cache.local_end == min(end, cap) == len(want)
        for layer in range(LAYERS):
            assert slot_values(cache, layer) == want, f"chunk {j}, layer {layer}"
        # q = 0 -> uniform attention: output = mean value of the attended slots = all filled slots
        torch.testing.assert_close(out[1], torch.full_like(out[1], sum(want) / len(want)), atol=1e-5, rtol=0)


def test_window_sink_same_chunk_calls_overwrite_not_advance(rope) -> None:
    policy, cache = new("window_sink", capacity_frames=12, sink_frames=3)
    for j in range(5):  # cache full and already evicting
        chunk(policy, cache, rope, j)
    call(policy, cache, rope, 15, CHUNK, "denoise")  # first call of chunk 5: evicts frames 3..5
    after_first = slot_values(cache)
    assert after_first == [0, 1, 2] + list(range(9, 15)) + [15 + NOISY, 16 + NOISY, 17 + NOISY]
    counters = (cache.global_end, cache.local_end)
    for _ in range(3):  # more noisy steps: same slots, no further eviction
        call(policy, cache, rope, 15, CHUNK, "denoise", offset=0.5)
        assert (cache.global_end, cache.local_end) == counters
        assert slot_values(cache) == after_first[:9] + [15.5, 16.5, 17.5]
    call(policy, cache, rope, 15, CHUNK, "rerun")
    assert (cache.global_end, cache.local_end) == counters == (18, 12)
    assert slot_values(cache) == [0, 1, 2] + list(range(9, 18))
    # keys of the chunk were overwritten too (roped at their absolute frames)
    torch.testing.assert_close(cache.k[1][:, 9 * S:], rope.apply(raw_k(range(15, 18), 1), range(15, 18), H, W), atol=0, rtol=0)


def test_window_sink_keeps_absolute_positions(rope) -> None:
    """LongLive-1.0: keys roped at write, never re-aligned — the sink stays at RoPE frames 0..2 (§c.1)."""
    policy, cache = new("window_sink", capacity_frames=12, sink_frames=3)
    for j in range(9):
        chunk(policy, cache, rope, j)
    for layer in range(LAYERS):
        assert torch.equal(cache.k[layer][:, : 3 * S], rope.apply(raw_k(range(3), layer), range(3), H, W))
        assert torch.equal(cache.k[layer][:, 3 * S:], rope.apply(raw_k(range(18, 27), layer), range(18, 27), H, W))


# --- 2. bounded memory ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,settings", [
    ("window_sink", {"capacity_frames": 12, "sink_frames": 3, "rope_overflow": "extend"}),
    ("window_sink", {"capacity_frames": 12, "sink_frames": 3, "rope": "relative"}),
    ("ema_sink", {"capacity_frames": 9, "sink_frames": 3, "alpha": 0.9}),
    ("deep_sink", {"capacity_frames": 21, "sink_frames": 14, "rope_overflow": "extend"}),
])
def test_bounded_memory_over_long_streams(name, settings) -> None:
    rope = Rope3D(HEAD_DIM, max_frames=64)  # 520 chunks = 1560 frames, far past the table
    policy, cache = new(name, **settings)
    nbytes = cache.nbytes
    ptrs = [t.data_ptr() for t in (*cache.k, *cache.v)]
    shapes = [t.shape for t in (*cache.k, *cache.v)]
    cap, sink = settings["capacity_frames"], settings["sink_frames"]
    for j in range(520):
        out = chunk(policy, cache, rope, j, steps=1)
        end = (j + 1) * CHUNK
        assert cache.global_end == end
        assert cache.local_end == min(end, cap) <= cap
        assert len(cache.state) <= 1  # bookkeeping does not grow with the stream
        if j % 50 == 0 or j == 519:
            assert cache.nbytes == nbytes
            assert [t.data_ptr() for t in (*cache.k, *cache.v)] == ptrs
            assert [t.shape for t in (*cache.k, *cache.v)] == shapes
            assert all(torch.isfinite(o).all() for o in out)
            tail = slot_values(cache, 1)[sink:]
            assert tail == expected_slots(end, cap, sink)[sink:]
    assert [t.data_ptr() for t in (*cache.k, *cache.v)] == ptrs and cache.nbytes == nbytes
    if name == "deep_sink":
        assert cache.state["sink_start_frame"] == 519 * CHUNK - cap


def test_bounded_memory_participative_compression() -> None:
    """deep_sink_pc: K/V and every preallocated state tensor keep their storage; the cache stays ≤ W frames
    and keeps the sink and the newest frames (the top-C middle is score-dependent)."""
    rope = Rope3D(HEAD_DIM, max_frames=64)
    policy, cache = new("deep_sink_pc", capacity_frames=21, sink_frames=10, budget_frames=16, recent_frames=4,
                        rope_overflow="extend")

    def storage() -> list[int]:
        state = [t.data_ptr() for v in cache.state.values() for t in (v if isinstance(v, (list, tuple)) else [v])
                 if isinstance(t, Tensor)]
        return [t.data_ptr() for t in (*cache.k, *cache.v)] + state

    nbytes, ptrs = cache.nbytes, storage()
    gen = torch.Generator().manual_seed(3)
    for j in range(500):
        for role in ("denoise", "rerun"):
            out = call(policy, cache, rope, j * CHUNK, CHUNK, role, q=torch.randn(1, CHUNK * S, HEADS, HEAD_DIM, generator=gen))
        assert cache.global_end == (j + 1) * CHUNK and cache.local_end <= 21
        if j % 50 == 0 or j == 499:
            assert cache.nbytes == nbytes and storage() == ptrs
            assert all(torch.isfinite(o).all() for o in out)
            tokens = cache.v[0][0, : cache.local_end * S, 0, 0]  # top-C keeps single tokens: check per token
            if j * CHUNK >= 21:
                assert torch.equal(tokens[: 10 * S], frame_v(range(10))[0, :, 0, 0])
                assert torch.equal(tokens[-4 * S:], frame_v(range(j * CHUNK - 1, j * CHUNK + 3))[0, :, 0, 0])


# --- 3. RoPE shift / Deep Sink re-alignment -----------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_rope_shift_time_round_trip_and_equals_roping_later(dtype, tol) -> None:
    rope = Rope3D(HEAD_DIM)
    x = torch.randn(2, 3 * S, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0), dtype=dtype)
    t_real = 2 * rope.split[0]
    for p, delta in [(0, 5), (7, 3), (40, -11), (2, 1000)]:
        roped = rope.apply(x, range(p, p + 3), H, W)
        y = roped.clone()
        rope.shift_time_(y, delta)
        torch.testing.assert_close(y, rope.apply(x, range(p + delta, p + delta + 3), H, W), atol=tol, rtol=tol)
        assert torch.equal(y[..., t_real:], roped[..., t_real:]), "shift_time_ touched spatial channels"
        assert not torch.allclose(y[..., :t_real], roped[..., :t_real])
        rope.shift_time_(y, -delta)
        torch.testing.assert_close(y, roped, atol=tol, rtol=tol)
    # in place through a view of a bigger buffer (how Deep Sink calls it on the sink slots)
    buf = rope.apply(x, range(0, 3), H, W)
    rope.shift_time_(buf[:, : S], 4)
    torch.testing.assert_close(buf[:, :S], rope.apply(x[:, :S], [4], H, W), atol=tol, rtol=tol)
    torch.testing.assert_close(buf[:, S:], rope.apply(x, range(0, 3), H, W)[:, S:], atol=0, rtol=0)


def test_deep_sink_realignment_equals_roping_at_new_start(rope) -> None:
    cap, sink = 21, 14
    policy, cache = new("deep_sink", capacity_frames=cap, sink_frames=sink)
    for j in range(13):  # evictions from chunk 7 (start 21) on: 6 of them
        start = j * CHUNK
        chunk(policy, cache, rope, j)
        if start < cap:
            assert "sink_start_frame" not in cache.state
            continue
        # desired sink start = start − (W − K) − K; the first eviction (start 21) records 0 without rotating
        assert cache.state["sink_start_frame"] == start - (cap - sink) - sink == start - cap
        first = cache.state["sink_start_frame"]
        for layer in range(LAYERS):
            sink_k = cache.k[layer][:, : sink * S]
            torch.testing.assert_close(sink_k, rope.apply(raw_k(range(sink), layer), range(first, first + sink), H, W),
                                       atol=1e-5, rtol=1e-5)
            tail = range(start + CHUNK - (cap - sink), start + CHUNK)
            torch.testing.assert_close(cache.k[layer][:, sink * S: cap * S], rope.apply(raw_k(tail, layer), tail, H, W),
                                       atol=0, rtol=0)
        assert slot_values(cache) == expected_slots(start + CHUNK, cap, sink)  # values never rotated/blended
    assert cache.state["sink_start_frame"] == 15  # moved 3 frames per eviction after the first


def test_deep_sink_same_chunk_calls_do_not_rotate_again(rope) -> None:
    policy, cache = new("deep_sink", capacity_frames=12, sink_frames=6)
    for j in range(6):
        chunk(policy, cache, rope, j)
    call(policy, cache, rope, 18, CHUNK, "denoise")
    sink_after_first_call = cache.k[0][:, : 6 * S].clone()
    state = dict(cache.state)
    for role in ("denoise", "denoise", "rerun"):
        call(policy, cache, rope, 18, CHUNK, role)
        assert torch.equal(cache.k[0][:, : 6 * S], sink_after_first_call)
        assert cache.state == state
    assert state["sink_start_frame"] == 18 - 12


# --- 4. EMA sink --------------------------------------------------------------------------------------
def test_ema_sink_alpha_half_exact_and_once_per_chunk(rope) -> None:
    a = 0.5
    policy, cache = new("ema_sink", capacity_frames=9, sink_frames=3, alpha=a)
    for j in range(3):  # frames 0..8 fill the cache; keys are stored un-roped
        chunk(policy, cache, rope, j)
    for layer in range(LAYERS):
        assert torch.equal(cache.k[layer][:, : 9 * S], raw_k(range(9), layer))
    sink_k = [cache.k[layer][:, : 3 * S].clone() for layer in range(LAYERS)]
    sink_v = [cache.v[layer][:, : 3 * S].clone() for layer in range(LAYERS)]
    for j, evicted in [(3, range(3, 6)), (4, range(6, 9)), (5, range(9, 12))]:
        call(policy, cache, rope, j * CHUNK, CHUNK, "denoise")  # first call of the chunk: one EMA update
        for layer in range(LAYERS):
            sink_k[layer] = a * sink_k[layer] + (1 - a) * raw_k(evicted, layer)
            sink_v[layer] = a * sink_v[layer] + (1 - a) * frame_v(evicted)  # the evicted frames' CLEAN values
            assert torch.equal(cache.k[layer][:, : 3 * S], sink_k[layer]), f"chunk {j} layer {layer}"
            assert torch.equal(cache.v[layer][:, : 3 * S], sink_v[layer])
        for role in ("denoise", "denoise", "rerun"):  # same-chunk calls: no further EMA
            call(policy, cache, rope, j * CHUNK, CHUNK, role)
            for layer in range(LAYERS):
                assert torch.equal(cache.k[layer][:, : 3 * S], sink_k[layer])
                assert torch.equal(cache.v[layer][:, : 3 * S], sink_v[layer])
        end = (j + 1) * CHUNK
        assert slot_values(cache)[3:] == list(range(end - 6, end))
        assert torch.equal(cache.k[1][:, 3 * S: 9 * S], raw_k(range(end - 6, end), 1))
    assert slot_values(cache)[:3] == [(((0 + 3) / 2 + 6) / 2 + 9) / 2 + i * 1.0 for i in range(3)]


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_ema_sink_alpha_extremes(rope, alpha) -> None:
    """α = 1 keeps the first chunk forever; α = 0 replaces the sink by the evicted chunk."""
    policy, cache = new("ema_sink", capacity_frames=9, sink_frames=3, alpha=alpha)
    for j in range(8):
        chunk(policy, cache, rope, j)
    sink_frames = range(3) if alpha == 1.0 else range(24 - 9, 24 - 6)  # last evicted: frames 15..17
    for layer in range(LAYERS):
        assert torch.equal(cache.k[layer][:, : 3 * S], raw_k(sink_frames, layer))
    assert slot_values(cache) == list(sink_frames) + list(range(18, 24))


@pytest.mark.parametrize("name,settings", [("ema_sink", {"alpha": 0.5}), ("window_sink", {"rope": "relative"})])
def test_slot_relative_positions(name, settings) -> None:
    """Un-roped cache; sink at RoPE frames 0..2, window at 3..8, query at its own slots 6..8 — whatever the
    absolute frame (§c.4; LongLive-infinity §c.1)."""
    rope = Rope3D(HEAD_DIM, max_frames=16)
    policy, cache = new(name, capacity_frames=9, sink_frames=3, **settings)
    for j in range(40):  # 120 frames, past max_frames: no error for a slot-relative policy
        chunk(policy, cache, rope, j)
    q = torch.randn(1, CHUNK * S, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(9))
    out = call(policy, cache, rope, 40 * CHUNK, CHUNK, "rerun", q=q)  # extends: evicts, then attends
    assert torch.equal(cache.k[0][:, 3 * S:], raw_k(range(117, 123), 0))  # stored un-roped
    for layer in range(LAYERS):
        want = attention(rope.apply(q, range(6, 9), H, W), rope.apply(cache.k[layer][:, : 9 * S], range(9), H, W),
                         cache.v[layer][:, : 9 * S])
        torch.testing.assert_close(out[layer], want, atol=1e-6, rtol=1e-6)


# --- 5. prompt re-cache with the real tiny model (spec §d) --------------------------------------------
# Layer-0 K/V of a frame recomputed in a 12-frame re-cache pass vs its 3-frame clean rerun differ only by
# float32 GEMM rounding (observed ≤ 3e-6 on |K| ≈ 6); prompt-dependent layers change by O(1).
LAYER0_TOL = 1e-5

def _recache_snapshots(tiny_model, text_encoder, monkeypatch, settings: dict, chunks_before: int):
    """Run a Stream, switch prompt with a re-cache, and snapshot the cache right before the re-cache pass
    (before `prepare_recache`) and right after it (at the next chunk's first `begin`), through the policy seam."""
    cfg = StreamConfig(8, 8, policy="window_sink", policy_settings=settings)
    stream = Stream(tiny_model, text_encoder, cfg, "a red fox runs across a snowy field")
    for _ in range(chunks_before):
        stream.next_chunk()
    policy, seen = stream.policy, {}
    begin, prepare = policy.begin, policy.prepare_recache

    def spy_prepare(cache):
        seen.setdefault("before", cache.clone())
        prepare(cache)

    def spy_begin(cache, call, rope):
        if call.role == "recache":
            seen.setdefault("before", cache.clone())
            seen["recache"], seen["cache"] = call, cache
        elif "recache" in seen and "after" not in seen:
            seen["after"] = cache.clone()
        return begin(cache, call, rope)

    monkeypatch.setattr(policy, "prepare_recache", spy_prepare)
    monkeypatch.setattr(policy, "begin", spy_begin)
    stream.set_prompt("a blue whale swims in the deep ocean", Transition("recache"))
    nxt = stream.next_chunk()
    c = chunks_before * CHUNK
    assert [a.of for a in nxt.acks] == ["prompt"] and nxt.first_frame == c
    n = min(settings["capacity_frames"], c)  # §d: frames [c − n, c) re-encoded in one pass
    assert seen["recache"] == CallSpec(c - n, n, "recache")
    return seen["before"], seen["after"], seen["cache"]


def _per_slot_diff(a: Tensor, b: Tensor, s: int) -> Tensor:
    return (a - b).abs().reshape(a.shape[0], -1, s, *a.shape[2:]).amax(dim=(0, 2, 3, 4))


def test_recache_global_sink_touches_only_non_sink_slots(tiny_model, text_encoder, monkeypatch) -> None:
    before, after, live = _recache_snapshots(tiny_model, text_encoder, monkeypatch,
                                             {"capacity_frames": 12, "sink_frames": 3}, chunks_before=5)
    s = before.tokens_per_frame
    assert (after.global_end, after.local_end) == (before.global_end, before.local_end) == (15, 12)
    assert (live.global_end, live.local_end) == (18, 12)  # the next chunk then extends as usual
    sink = slice(0, 3 * s)
    for layer in range(tiny_model.cfg.num_layers):
        for name in ("k", "v"):
            b, a = getattr(before, name)[layer], getattr(after, name)[layer]
            assert torch.equal(a[:, sink], b[:, sink]), f"sink slots of layer {layer} {name} changed"
            if layer == 0:  # layer-0 self-attention K/V do not depend on the prompt (GEMM rounding only)
                torch.testing.assert_close(a, b, atol=LAYER0_TOL, rtol=LAYER0_TOL)
            else:
                changed = _per_slot_diff(a[:, 3 * s:], b[:, 3 * s:], s)
                assert changed.min() > 1e-3, f"layer {layer} {name}: some non-sink slot kept its old-prompt K/V: {changed}"


def test_recache_without_global_sink_rebuilds_sink(tiny_model, text_encoder, monkeypatch) -> None:
    before, after, _ = _recache_snapshots(tiny_model, text_encoder, monkeypatch,
                                          {"capacity_frames": 12, "sink_frames": 3, "global_sink": False}, chunks_before=5)
    s = before.tokens_per_frame
    assert (after.global_end, after.local_end) == (before.global_end, before.local_end) == (15, 12)
    for layer in range(tiny_model.cfg.num_layers):
        for name in ("k", "v"):
            b, a = getattr(before, name)[layer], getattr(after, name)[layer]
            # sink = frames 3..5 (c − 12 .. c − 10) recomputed under the new prompt: differs from frames 0..2
            assert _per_slot_diff(a[:, : 3 * s], b[:, : 3 * s], s).min() > 1e-3
            if layer == 0:  # frames 6..14 sit in the same slots and layer 0 ignores the prompt
                torch.testing.assert_close(a[:, 3 * s:], b[:, 3 * s:], atol=LAYER0_TOL, rtol=LAYER0_TOL)
            else:
                assert _per_slot_diff(a[:, 3 * s:], b[:, 3 * s:], s).min() > 1e-3


def test_recache_before_window_is_full_rewrites_from_frame_zero(tiny_model, text_encoder, monkeypatch) -> None:
    """Switch at frame 6 < capacity: the re-cache range starts at frame 0, and the reference's recompute
    guard only protects the sink when current_start > 0 (§c.1), so the sink is re-encoded as well."""
    before, after, _ = _recache_snapshots(tiny_model, text_encoder, monkeypatch,
                                          {"capacity_frames": 12, "sink_frames": 3}, chunks_before=2)
    s = before.tokens_per_frame
    assert (after.global_end, after.local_end) == (before.global_end, before.local_end) == (6, 6)
    torch.testing.assert_close(after.k[0], before.k[0], atol=LAYER0_TOL, rtol=LAYER0_TOL)
    assert _per_slot_diff(after.k[1][:, : 6 * s], before.k[1][:, : 6 * s], s).min() > 1e-3
    assert torch.equal(after.k[1][:, 6 * s:], before.k[1][:, 6 * s:])  # unfilled slots untouched


# --- 6. errors ----------------------------------------------------------------------------------------
def test_full_policy_raises_past_capacity(rope) -> None:
    policy, cache = new("full", capacity_frames=6)
    chunk(policy, cache, rope, 0)
    chunk(policy, cache, rope, 1)
    chunk(policy, cache, rope, 1)  # same-chunk calls on a full cache are fine
    snapshot = cache.clone()
    with pytest.raises(CacheFullError) as err:
        call(policy, cache, rope, 6, CHUNK)
    msg = str(err.value)
    assert "full" in msg and all(alt in msg for alt in ("window_sink", "ema_sink", "deep_sink"))
    assert (cache.global_end, cache.local_end) == (6, 6)  # a refused call changes nothing
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, snapshot.k + snapshot.v))


@pytest.mark.parametrize("name,settings", [
    ("window_sink", {"capacity_frames": 6, "sink_frames": 3}),
    ("deep_sink", {"capacity_frames": 6, "sink_frames": 3}),
    ("full", {"capacity_frames": 60}),
])
def test_absolute_rope_policies_stop_at_the_table(name, settings) -> None:
    rope = Rope3D(HEAD_DIM, max_frames=9)
    policy, cache = new(name, **settings)
    for j in range(3):  # frames 0..8 fit the 9-frame table exactly
        chunk(policy, cache, rope, j)
    counters = (cache.global_end, cache.local_end)
    with pytest.raises(CacheFullError) as err:
        call(policy, cache, rope, 9, CHUNK)
    msg = str(err.value)
    assert "RoPE" in msg and "9" in msg and "ema_sink" in msg and "rope_overflow" in msg
    assert (cache.global_end, cache.local_end) == counters
    extended, cache2 = new(name, **settings, rope_overflow="extend")
    for j in range(5):
        chunk(extended, cache2, rope, j)
    assert cache2.global_end == 15


@pytest.mark.parametrize("name,settings", [("ema_sink", {}), ("window_sink", {"rope": "relative"})])
def test_slot_relative_policy_has_no_rope_limit(name, settings) -> None:
    rope = Rope3D(HEAD_DIM, max_frames=9)
    policy, cache = new(name, capacity_frames=6, sink_frames=3, **settings)
    for j in range(10):
        chunk(policy, cache, rope, j)
    assert cache.global_end == 30


def test_make_policy_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError) as err:
        make_policy("nope")
    msg = str(err.value)
    assert "'nope'" in msg
    for known in ("full", "window_sink", "ema_sink", "deep_sink", "deep_sink_pc", "rolling_anchor"):
        assert known in msg


@pytest.mark.parametrize("name,settings,needle", [
    ("window_sink", {"capacity_frames": 12, "sink_frames": 12}, "sink_frames"),
    ("window_sink", {"capacity_frames": 12, "sink_frames": 13}, "sink_frames"),
    ("window_sink", {"capacity_frames": 12, "sink_frames": -1}, "sink_frames"),
    ("ema_sink", {"capacity_frames": 9, "sink_frames": 9}, "sink_frames"),
    ("deep_sink", {"capacity_frames": 21, "sink_frames": 21}, "sink_frames"),
    ("ema_sink", {"capacity_frames": 9, "sink_frames": 3, "alpha": -0.01}, "alpha"),
    ("ema_sink", {"capacity_frames": 9, "sink_frames": 3, "alpha": 1.01}, "alpha"),
    ("ema_sink", {"capacity_frames": 9, "sink_frames": 3, "alpha": math.nan}, "alpha"),
    ("window_sink", {"capacity_frames": 0, "sink_frames": 0}, "capacity_frames"),
    ("full", {"capacity_frames": -3}, "capacity_frames"),
    ("rolling_anchor", {"capacity_frames": 0}, "capacity_frames"),
    ("window_sink", {"rope_overflow": "wrap"}, "rope_overflow"),
    ("window_sink", {"rope": "rotary"}, "rope"),
])
def test_invalid_settings_raise_value_error(name, settings, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        make_policy(name, **settings)


# --- 7. rolling_anchor --------------------------------------------------------------------------------
def _rolling_window(policy, cache, rope, w: int, q: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Window w of Rolling Forcing: one call on blocks max(0, w−4)..w (noisy), then the rerun of its first block."""
    first = max(0, w - 4)
    n = (w - first + 1) * CHUNK
    win = call(policy, cache, rope, first * CHUNK, n, "denoise", q=None if q is None else q[:, : n * S])
    rerun = call(policy, cache, rope, first * CHUNK, CHUNK, "rerun")
    return win, rerun


def test_rolling_anchor_unroped_never_evicted_and_oldest_block_dropped(rope) -> None:
    policy, cache = new("rolling_anchor", capacity_frames=24, attention_frames=21, block_frames=3)
    ptrs = [t.data_ptr() for t in (*cache.k, *cache.v)]
    for w in range(30):
        win, rerun = _rolling_window(policy, cache, rope, w)
        first = max(0, w - 4)  # newest cached block
        cached = [0] + list(range(max(1, first - 6), first + 1)) if first else [0]
        want = [b * CHUNK + i for b in cached for i in range(CHUNK)]
        assert (cache.global_end, cache.local_end) == ((first + 1) * CHUNK, len(want))
        assert slot_values(cache) == want, f"window {w}"
        for layer in range(LAYERS):
            assert torch.equal(cache.k[layer][:, : CHUNK * S], raw_k(range(CHUNK), layer)), "anchor keys roped or moved"
            if first:  # every other cached block sits roped at its absolute frames
                frames = want[CHUNK:]
                torch.testing.assert_close(cache.k[layer][:, CHUNK * S: len(want) * S],
                                           rope.apply(raw_k(frames, layer), frames, H, W), atol=0, rtol=0)
        # q = 0 -> output = mean value of the attended keys
        if first >= 2:  # full window: anchor + 3-frame working cache (the block before) + the window itself
            seen = [0, 1, 2] + [(first - 1) * CHUNK + i for i in range(CHUNK)] + \
                   [f + NOISY for f in range(first * CHUNK, (w + 1) * CHUNK)]
            torch.testing.assert_close(win[0], torch.full_like(win[0], sum(seen) / len(seen)), atol=1e-5, rtol=0)
        rerun_seen = want[max(0, len(want) - 21):]  # ≤ 21 frames ending at the rerun block; anchor only while at slot 0
        torch.testing.assert_close(rerun[1], torch.full_like(rerun[1], sum(rerun_seen) / len(rerun_seen)), atol=1e-5, rtol=0)
    assert [t.data_ptr() for t in (*cache.k, *cache.v)] == ptrs and cache.local_end == 24


def test_rolling_anchor_is_repositioned_before_working_cache(rope) -> None:
    """A full window's attention equals attending to the anchor roped at (start − working − 3)."""
    policy, cache = new("rolling_anchor", capacity_frames=24, attention_frames=21, block_frames=3)
    for w in range(14):
        _rolling_window(policy, cache, rope, w)
    w, first = 14, 10
    q = torch.randn(1, 15 * S, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(5))
    prev = cache.clone()
    win = call(policy, cache, rope, first * CHUNK, 15, "denoise", q=q)
    frames = range(first * CHUNK, first * CHUNK + 15)
    for layer in range(LAYERS):
        anchor = rope.apply(raw_k(range(3), layer), range(first * CHUNK - 3 - 3, first * CHUNK - 3), H, W)
        working = prev.k[layer][:, 21 * S: 24 * S]  # block 9 = the cache's newest block before this window
        keys = torch.cat([anchor, working, rope.apply(raw_k(frames, layer), frames, H, W)], dim=1)
        values = torch.cat([frame_v(range(3)), prev.v[layer][:, 21 * S: 24 * S], frame_v(frames, NOISY)], dim=1)
        want = attention(rope.apply(q, frames, H, W), keys, values)
        torch.testing.assert_close(win[layer], want, atol=1e-6, rtol=1e-6)


# --- regressions: configurations that once corrupted a cache ---------------------------------------
def test_deep_sink_recache_without_global_sink_keeps_sink_position_consistent(rope) -> None:
    cap, sink = 21, 14
    policy, cache = new("deep_sink", capacity_frames=cap, sink_frames=sink, global_sink=False)
    for j in range(9):
        chunk(policy, cache, rope, j)
    c = 9 * CHUNK  # switch at frame 27: re-cache frames 6..26 (what ExactExecution._recache does)
    policy.prepare_recache(cache)
    call(policy, cache, rope, c - cap, cap, "recache")
    assert slot_values(cache)[:sink] == list(range(c - cap, c - cap + sink))
    chunk(policy, cache, rope, 9)  # next chunk evicts and re-aligns
    first = cache.state["sink_start_frame"]
    assert first == c - cap  # desired start for the chunk at frame 27
    torch.testing.assert_close(cache.k[0][:, : sink * S],
                               rope.apply(raw_k(range(c - cap, c - cap + sink), 0), range(first, first + sink), H, W),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,cap,sink", [("window_sink", 12, 10), ("deep_sink", 21, 19)])
def test_chunk_wider_than_the_tail_is_refused_before_touching_the_cache(rope, name, cap, sink) -> None:
    """A chunk that cannot fit beside the sink would have to evict sink frames; the policy refuses it."""
    policy, cache = new(name, capacity_frames=cap, sink_frames=sink)
    with pytest.raises(ValueError, match=f"does not fit beside a {sink}-frame sink in a {cap}-frame cache"):
        chunk(policy, cache, rope, 0)
    assert (cache.global_end, cache.local_end) == (0, 0)


def test_ema_sink_refuses_an_eviction_of_the_wrong_size_and_keeps_the_cache(rope) -> None:
    policy, cache = new("ema_sink", capacity_frames=10, sink_frames=3)
    for j in range(3):
        chunk(policy, cache, rope, j)
    before = slot_values(cache)
    with pytest.raises(ValueError, match="evictions must be exactly sink_frames=3 frames, got 2"):
        chunk(policy, cache, rope, 3)
    assert (cache.global_end, cache.local_end) == (9, 9)
    assert slot_values(cache) == before


def test_rolling_anchor_capacity_must_be_a_multiple_of_the_block() -> None:
    with pytest.raises(ValueError, match=r"capacity_frames \(10\) must be a multiple of block_frames \(3\)"):
        new("rolling_anchor", capacity_frames=10, attention_frames=9, block_frames=3)
