"""The stream API: determinism, isolation, controls at chunk boundaries, timestep-slot execution."""
from __future__ import annotations

import pytest
import torch

from streamgen.cache.policy import CacheFullError
from streamgen.engine.prompts import Transition, interpolate
from streamgen.engine.stream import Stream, StreamConfig

WINDOW = {"policy": "window_sink", "policy_settings": {"capacity_frames": 12, "sink_frames": 3}}


def generate(stream: Stream, chunks: int) -> torch.Tensor:
    return torch.cat([stream.next_chunk().latents for _ in range(chunks)], dim=1)


def test_same_seed_same_latents_other_seed_differs(tiny_model, text_encoder) -> None:
    a = generate(Stream(tiny_model, text_encoder, StreamConfig(8, 8, seed=3, **WINDOW), "a red circle"), 6)
    b = generate(Stream(tiny_model, text_encoder, StreamConfig(8, 8, seed=3, **WINDOW), "a red circle"), 6)
    c = generate(Stream(tiny_model, text_encoder, StreamConfig(8, 8, seed=4, **WINDOW), "a red circle"), 6)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


def test_two_streams_interleaved_equal_each_alone(tiny_model, text_encoder) -> None:
    cfg_a = StreamConfig(8, 8, seed=1, **WINDOW)
    cfg_b = StreamConfig(8, 8, seed=2, policy="ema_sink")
    alone_a = generate(Stream(tiny_model, text_encoder, cfg_a, "a red circle"), 6)
    alone_b = generate(Stream(tiny_model, text_encoder, cfg_b, "a blue square"), 6)
    sa, sb = Stream(tiny_model, text_encoder, cfg_a, "a red circle"), Stream(tiny_model, text_encoder, cfg_b, "a blue square")
    both_a, both_b = [], []
    for _ in range(6):
        both_a.append(sa.next_chunk().latents)
        both_b.append(sb.next_chunk().latents)
    assert torch.equal(torch.cat(both_a, 1), alone_a)
    assert torch.equal(torch.cat(both_b, 1), alone_b)


@pytest.mark.parametrize("policy", ["window_sink", "ema_sink", "deep_sink"])
def test_timestep_slot_batched_equals_unbatched(tiny_model, text_encoder, policy) -> None:
    """Stream batch (steps of consecutive chunks in one forward) = slots one by one, incl. a re-cache."""
    out = {}
    for batched in (True, False):
        s = Stream(tiny_model, text_encoder, StreamConfig(8, 8, policy=policy, schedule="timestep-slot", batch_slots=batched),
                   "a red circle")
        s.set_prompt("a blue square moving left", at_frame=15)
        out[batched] = generate(s, 8)
    assert (out[True] - out[False]).abs().max() <= 1e-5


def test_timestep_slot_differs_from_exact(tiny_model, text_encoder) -> None:
    """Slot caches hold K/V of noisy inputs, not clean reruns: a different (distributable) semantics."""
    exact = generate(Stream(tiny_model, text_encoder, StreamConfig(8, 8, **WINDOW), "a red circle"), 3)
    slot = generate(Stream(tiny_model, text_encoder, StreamConfig(8, 8, schedule="timestep-slot", **WINDOW), "a red circle"), 3)
    assert torch.allclose(exact[:, :3], slot[:, :3], atol=1e-5)  # first chunk: each step sees only its own chunk in both
    assert (exact[:, 3:] - slot[:, 3:]).abs().max() > 1e-3


def test_prompt_change_lands_at_next_chunk_and_is_acknowledged(tiny_model, text_encoder) -> None:
    s = Stream(tiny_model, text_encoder, StreamConfig(8, 8, **WINDOW), "a red circle")
    ref = Stream(tiny_model, text_encoder, StreamConfig(8, 8, **WINDOW), "a red circle")
    for _ in range(4):
        assert torch.equal(s.next_chunk().latents, ref.next_chunk().latents)
    s.set_prompt("a blue square moving left")
    chunk = s.next_chunk()
    assert [(a.of, a.frame, a.chunk) for a in chunk.acks] == [("prompt", 12, 4)]
    assert (chunk.latents - ref.next_chunk().latents).abs().max() > 1e-3
    assert s.next_chunk().acks == []


def test_blend_interpolates_over_n_chunks(tiny_model, text_encoder) -> None:
    s = Stream(tiny_model, text_encoder, StreamConfig(8, 8, **WINDOW), "a red circle")
    s.next_chunk()
    start, target = text_encoder.encode("a red circle"), text_encoder.encode("a blue square")
    s.set_prompt("a blue square", Transition("blend", chunks=4, interpolation="linear"))
    contexts = []
    for _ in range(5):
        s.next_chunk()
        contexts.append(s.timeline.context)
    for i, ctx in enumerate(contexts[:4]):
        assert torch.allclose(ctx, torch.lerp(start, target, (i + 1) / 4))
    assert torch.equal(contexts[4], target)


def test_slerp_keeps_norm_and_endpoints() -> None:
    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)
    mid = interpolate(a, b, 0.5, "slerp")
    assert torch.allclose(mid.norm(dim=-1), a.norm(dim=-1), atol=1e-5)
    assert torch.allclose(interpolate(a, b, 0.0, "slerp"), a, atol=1e-6)
    assert torch.allclose(interpolate(a, b, 1.0, "slerp"), b, atol=1e-5)


def test_params_apply_at_boundary_and_unknown_params_are_refused(tiny_model, text_encoder) -> None:
    s = Stream(tiny_model, text_encoder, StreamConfig(8, 8, seed=1, **WINDOW), "a red circle")
    s.next_chunk()
    with pytest.raises(ValueError, match="known: seed, steps, transition"):
        s.set_params(guidance=3.0)
    with pytest.raises(ValueError, match="strictly decrease"):
        s.set_params(steps=[250, 500])
    s.set_params(seed=9, steps=[1000, 500])
    chunk = s.next_chunk()
    assert chunk.acks[0].of == "params" and chunk.acks[0].frame == 3
    assert s.dit_calls == 5 + 3  # 4 steps + rerun, then 2 steps + rerun


def test_reset_restarts_from_frame_zero(tiny_model, text_encoder) -> None:
    s = Stream(tiny_model, text_encoder, StreamConfig(8, 8, **WINDOW), "a red circle")
    first = s.next_chunk().latents
    s.next_chunk()
    s.reset()
    again = s.next_chunk()
    assert again.index == 0 and [a.of for a in again.acks] == ["reset"]
    assert torch.equal(again.latents, first)


def test_rolling_stream_emits_blocks_and_refuses_recache(tiny_model, text_encoder) -> None:
    cfg = StreamConfig(8, 8, sampler="rolling", policy="rolling_anchor", steps=(1000, 800, 600, 400, 200))
    s = Stream(tiny_model, text_encoder, cfg, "a red circle")
    chunks = [s.next_chunk() for _ in range(3)]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert s.dit_calls == 2 * 7  # 5 warm-up windows then one per block, each with its rerun
    with pytest.raises(ValueError, match="blend"):
        s.set_prompt("a blue square", Transition("recache"))


def test_unknown_names_list_the_known_ones(tiny_model, text_encoder) -> None:
    with pytest.raises(ValueError, match="known: few_step, rolling"):
        StreamConfig(8, 8, sampler="euler")
    with pytest.raises(ValueError, match="known: exact, timestep-slot"):
        StreamConfig(8, 8, schedule="async")
    with pytest.raises(ValueError, match="known: deep_sink, deep_sink_pc, ema_sink, full"):
        Stream(tiny_model, text_encoder, StreamConfig(8, 8, policy="lru"), "x")


def test_full_cache_says_what_to_use_past_capacity(tiny_model, text_encoder) -> None:
    s = Stream(tiny_model, text_encoder, StreamConfig(8, 8, policy="full", policy_settings={"capacity_frames": 6}), "x")
    generate(s, 2)
    with pytest.raises(CacheFullError, match="bounded policy"):
        s.next_chunk()
