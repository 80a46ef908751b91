"""The Ray timestep pipeline (TPP) on a real local Ray cluster: same latents as the in-process
timestep-slot stream, sessions sharing a pipeline, admission, and recovery from dead or hung stages."""
from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

ray = pytest.importorskip("ray")

from streamgen.backends.base import CapacityError, StreamFailedError  # noqa: E402
from streamgen.backends.ray.pipeline import Pipeline  # noqa: E402
from streamgen.backends.ray.pipeline_config import PipelineConfig, split_steps  # noqa: E402
from streamgen.backends.ray.pipeline_stream import PipelineFrameStream  # noqa: E402
from streamgen.engine.stream import Stream  # noqa: E402

from .hang_guard import returns  # noqa: E402

CHUNKS = 8
SWITCH = ("a blue whale swimming slowly", 15)  # latent frame 15 = chunk 5: a re-cache in every slot






@pytest.fixture(scope="module")
def pipe(ray_cluster, tiny_bundle):
    p = Pipeline(PipelineConfig(model="tiny-random", stages=2, stage_resources={"num_cpus": 0.5}, threads=1,
                                decoder_resources={"num_cpus": 0.1}, tick_timeout_s=6, ping_timeout_s=2,
                                recover_timeout_s=60, start_timeout_s=120), tiny_bundle.dit.cfg)
    yield p
    p.shutdown()


def local_chunks(tiny_bundle, overrides, prompt="a red fox running", switch=SWITCH, chunks=CHUNKS):
    cfg = replace(tiny_bundle.stream, **{**overrides, "schedule": "timestep-slot"})
    s = Stream(tiny_bundle.dit, tiny_bundle.text_encoder, cfg, prompt)
    if switch:
        s.set_prompt(switch[0], at_frame=switch[1])
    return [s.next_chunk() for _ in range(chunks)]


def pipeline_chunks(pipe, tiny_bundle, overrides, prompt="a red fox running", switch=SWITCH, chunks=CHUNKS):
    fs = PipelineFrameStream(pipe, tiny_bundle, prompt, overrides)
    if switch:
        fs.set_prompt(switch[0], at_frame=switch[1])
    try:
        return [fs.next() for _ in range(chunks)]
    finally:
        fs.close()


def test_split_steps() -> None:
    assert split_steps(4, 2) == [[0, 1], [2, 3]]
    assert split_steps(3, 2) == [[0, 1], [2]]
    assert split_steps(1, 2) == [[0], []]
    assert split_steps(4, 2, [[0, 1, 2], [3]]) == [[0, 1, 2], [3]]


def test_two_stages_equal_local_timestep_slot_with_prompt_change(pipe, tiny_bundle) -> None:
    """4 steps on 2 stages (2 each), batched per stage tick: same latents and acks as in process."""
    ours = pipeline_chunks(pipe, tiny_bundle, {"seed": 3})
    ref = local_chunks(tiny_bundle, {"seed": 3})
    assert [c.index for c in ours] == list(range(CHUNKS))
    for a, r in zip(ours, ref):
        assert (a.latents - r.latents).abs().max() <= 1e-5
        assert [(x.of, x.frame, x.chunk) for x in a.acks] == [(x.of, x.frame, x.chunk) for x in r.acks]
    assert any(x.of == "prompt" for c in ours for x in c.acks)
    assert ours[0].frames.dtype == torch.uint8 and ours[0].frames.shape == (3, 32, 32, 3)
    # the switch changed the stream from chunk 5 on (it is not a no-op)
    plain = local_chunks(tiny_bundle, {"seed": 3}, switch=None)
    assert torch.equal(plain[4].latents, ref[4].latents) and (plain[5].latents - ref[5].latents).abs().max() > 1e-3


def test_unbatched_pipeline_is_bit_identical(pipe, tiny_bundle) -> None:
    """Same thread count in driver and stages, one forward per slot on both sides: torch.equal."""
    ours = pipeline_chunks(pipe, tiny_bundle, {"seed": 5, "batch_slots": False})
    ref = local_chunks(tiny_bundle, {"seed": 5, "batch_slots": False})
    for a, r in zip(ours, ref):
        assert torch.equal(a.latents, r.latents)


def test_uneven_steps_and_two_sessions_sharing_the_pipeline(pipe, tiny_bundle) -> None:
    """3 steps on 2 stages ([0, 1], [2]) and a 4-step stream, driven from two threads at once:
    each equals its own in-process run; their chunks share stage ticks."""
    ticks_before = len(pipe.timeline)
    specs = {"a": ({"seed": 1, "steps": (1000, 600, 300)}, "a red fox running"),
             "b": ({"seed": 2}, "a green frog jumping")}
    out: dict[str, list] = {}

    def drive(name: str) -> None:
        overrides, prompt = specs[name]
        out[name] = pipeline_chunks(pipe, tiny_bundle, overrides, prompt, switch=None, chunks=6)

    threads = [threading.Thread(target=drive, args=(n,)) for n in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, (overrides, prompt) in specs.items():
        ref = local_chunks(tiny_bundle, overrides, prompt, switch=None, chunks=6)
        for a, r in zip(out[name], ref):
            assert (a.latents - r.latents).abs().max() <= 1e-5
    shared = [t["sessions"] for t in list(pipe.timeline)[ticks_before:]]
    assert max(shared) == 2  # at least one tick carried both sessions' work


def test_a_stream_whose_step_raises_fails_alone(pipe, tiny_bundle) -> None:
    """Stream `bad` (a `full` cache too small for its length) raises in a stage at chunk 2; stream `good`
    shares the same stage ticks and goes on, equal to its own in-process run (issue 17: a bad session
    ended other viewers' streams on Ray)."""
    bad_overrides = {"seed": 3, "policy": "full", "policy_settings": {"capacity_frames": 15}}
    out: dict[str, list] = {}
    errors: dict[str, BaseException] = {}

    def drive(name: str, overrides: dict, chunks: int) -> None:
        fs = PipelineFrameStream(pipe, tiny_bundle, f"a {name} fox", overrides)
        got = out.setdefault(name, [])
        try:
            for _ in range(chunks):
                got.append(fs.next())
        except StreamFailedError as exc:
            errors[name] = exc
        finally:
            fs.close()

    threads = [threading.Thread(target=drive, args=("bad", bad_overrides, 6)),
               threading.Thread(target=drive, args=("good", {"seed": 4}, 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(errors) == {"bad"} and "CacheFullError" in str(errors["bad"]), errors
    assert len(out["bad"]) == 2 and len(out["good"]) == 6
    ref = local_chunks(tiny_bundle, {"seed": 4}, "a good fox", switch=None, chunks=6)
    for a, r in zip(out["good"], ref, strict=True):
        assert (a.latents - r.latents).abs().max() <= 1e-5
    assert pipe.stats()["sessions"] == 0  # both released, the failed one too


def test_admission_is_memory_budgeted(pipe, tiny_bundle) -> None:
    saved = pipe.cfg.kv_budget_bytes
    pipe.cfg.kv_budget_bytes = 1024
    try:
        with pytest.raises(CapacityError, match="KV budget"):
            PipelineFrameStream(pipe, tiny_bundle, "a red fox", {})
    finally:
        pipe.cfg.kv_budget_bytes = saved
    with pytest.raises(ValueError, match="timestep-slot"):
        PipelineFrameStream(pipe, tiny_bundle, "a red fox", {"schedule": "exact"})


def test_killed_stage_is_replaced_and_streams_resume(pipe, tiny_bundle) -> None:
    a = PipelineFrameStream(pipe, tiny_bundle, "a red fox running", {"seed": 3})
    b = PipelineFrameStream(pipe, tiny_bundle, "a green frog jumping", {"seed": 4})
    try:
        for _ in range(5):
            a.next()
            b.next()
        old = pipe.stages[1]
        ray.kill(old)
        ca = returns(a.next, hang_s=120)
        cb = b.next()
        assert ca.index == 5 and cb.index == 5  # no chunk lost, none repeated
        assert ca.stall is not None and "stage1" in ca.stall["replaced"] and cb.stall is not None
        assert a.stalls == 1 and b.stalls == 1
        assert pipe.stages[1] is not old
        rest = [a.next() for _ in range(3)]
        assert [c.index for c in rest] == [6, 7, 8] and all(c.stall is None for c in rest)
        assert all(torch.isfinite(c.latents).all() for c in rest)
        # resumed from re-cached KV: close to, not equal to, the uninterrupted stream
        ref = local_chunks(tiny_bundle, {"seed": 3}, switch=None, chunks=9)
        assert (rest[-1].latents - ref[8].latents).abs().max() < 0.5
    finally:
        a.close()
        b.close()


def test_hung_stage_times_out_and_is_replaced(pipe, tiny_bundle) -> None:
    """A stage stuck past the tick timeout is killed and replaced: next() returns, it never hangs."""
    fs = PipelineFrameStream(pipe, tiny_bundle, "a red fox running", {"seed": 7})
    try:
        for _ in range(3):
            fs.next()
        stuck = pipe.stages[0]
        stuck.__ray_call__.remote(lambda self: time.sleep(120))
        chunk = returns(fs.next, hang_s=pipe.cfg.tick_timeout_s + pipe.cfg.ping_timeout_s + 120)
        assert chunk.index == 3 and chunk.stall is not None and "stage0" in chunk.stall["replaced"]
        assert fs.next().index == 4
    finally:
        fs.close()


def test_unrecoverable_failure_raises_clearly(ray_cluster, tiny_bundle) -> None:
    """If a dead stage cannot be replaced, next() raises StreamFailedError instead of hanging."""
    p = Pipeline(PipelineConfig(model="tiny-random", stages=1, stage_resources={"num_cpus": 0.25}, threads=1,
                                decoder_resources={"num_cpus": 0.05}, tick_timeout_s=5, ping_timeout_s=1,
                                recover_timeout_s=1), tiny_bundle.dit.cfg)
    fs = PipelineFrameStream(p, tiny_bundle, "a red fox", {})
    try:
        fs.next()
        p._make_actor = lambda i: (_ for _ in ()).throw(RuntimeError("no room to re-create the actor"))
        ray.kill(p.stages[0])
        with pytest.raises(StreamFailedError, match="recovery"):
            returns(fs.next, hang_s=120)
        with pytest.raises(StreamFailedError):
            fs.next()
    finally:
        p.shutdown()


def test_params_and_reset_mid_stream_match_local(pipe, tiny_bundle) -> None:
    """Seed and step values changed mid-stream, then a reset: controls stay in the driver-side
    Stream, new step values reach every stage in the same tick as in process."""
    def drive(next_chunk, stream):
        out = []
        for i in range(9):
            if i == 2:
                stream.set_params(seed=9, steps=[1000, 800, 400, 200])
            if i == 5:
                stream.reset()
            out.append(next_chunk())
        return out

    fs = PipelineFrameStream(pipe, tiny_bundle, "a red fox running", {"seed": 3})
    try:
        ours = drive(fs.next, fs)
    finally:
        fs.close()
    cfg = replace(tiny_bundle.stream, schedule="timestep-slot", seed=3)
    s = Stream(tiny_bundle.dit, tiny_bundle.text_encoder, cfg, "a red fox running")
    ref = drive(s.next_chunk, s)
    assert [c.index for c in ours] == [c.index for c in ref] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    for a, r in zip(ours, ref):
        assert (a.latents - r.latents).abs().max() <= 1e-5
        assert [(x.of, x.frame, x.chunk) for x in a.acks] == [(x.of, x.frame, x.chunk) for x in r.acks]
    assert len(pipe.sessions) == 0 or fs.execution.session.sid not in pipe.sessions


def test_decoder_killed_during_a_tick(pipe, tiny_bundle) -> None:
    """Killed while chunks are in flight (a timer fires inside next()): no chunk lost or repeated."""
    fs = PipelineFrameStream(pipe, tiny_bundle, "a red fox running", {"seed": 8})
    try:
        indices = [fs.next().index for _ in range(3)]
        threading.Timer(0.003, ray.kill, [pipe.decoder]).start()
        indices += [fs.next().index for _ in range(4)]
        assert indices == list(range(7)) and fs.stalls == 1
    finally:
        fs.close()


def test_blend_transition_ships_each_context_once(pipe, tiny_bundle) -> None:
    """A blend makes a new context every chunk: each reaches the stages once, results match local."""
    from streamgen.engine.prompts import Transition

    blend = Transition("blend", chunks=3, interpolation="slerp")
    fs = PipelineFrameStream(pipe, tiny_bundle, "a red fox running", {"seed": 11})
    fs.set_prompt("a blue whale swimming", blend, at_frame=9)
    try:
        ours = [fs.next() for _ in range(8)]
    finally:
        fs.close()
    cfg = replace(tiny_bundle.stream, schedule="timestep-slot", seed=11)
    s = Stream(tiny_bundle.dit, tiny_bundle.text_encoder, cfg, "a red fox running")
    s.set_prompt("a blue whale swimming", blend, at_frame=9)
    ref = [s.next_chunk() for _ in range(8)]
    for a, r in zip(ours, ref):
        assert (a.latents - r.latents).abs().max() <= 1e-5
