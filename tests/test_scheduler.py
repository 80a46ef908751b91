"""The engine loop: many streams' DiT calls in one scheduler, each result equal to the stream run alone."""
from __future__ import annotations

import pytest
import torch

from streamgen.engine.frame_stream import FrameChunk, FrameStream
from streamgen.engine.prompts import Transition
from streamgen.engine.scheduler import Engine, RequestState

# Streams of different policies, schedules and samplers: they batch wherever their shapes agree.
CONFIGS = [
    {"policy": "window_sink", "policy_settings": {"capacity_frames": 12, "sink_frames": 3}, "seed": 1},
    {"policy": "ema_sink", "seed": 2},
    {"policy": "ema_sink", "schedule": "timestep-slot", "seed": 3},
    {"policy": "rolling_anchor", "sampler": "rolling", "steps": (1000, 800, 600, 400, 200), "seed": 4},
    {"policy": "deep_sink", "seed": 5},
]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cyan circle", "a white square"]


class Collect:
    """A sink that wants `limit` chunks, as fast as the engine makes them."""

    def __init__(self, limit: int) -> None:
        self.limit, self.chunks, self.error = limit, [], None

    def wants_chunk(self) -> bool:
        return len(self.chunks) < self.limit

    def deliver(self, chunk: FrameChunk, seconds: float) -> None:
        self.chunks.append(chunk)

    def fail(self, exc: BaseException) -> None:
        self.error = exc

    @property
    def latents(self) -> torch.Tensor:
        return torch.cat([c.latents for c in self.chunks], dim=1)


def alone(bundle, overrides: dict, prompt: str, chunks: int, controls=None) -> torch.Tensor:
    fs = FrameStream(bundle, prompt, overrides)
    out = []
    for j in range(chunks):
        if controls:
            controls(fs, j)
        out.append(fs.next().latents)
    return torch.cat(out, dim=1)


def run(engine: Engine, sinks: list[Collect], ticks: int = 10_000) -> None:
    for _ in range(ticks):
        if not engine.step() and all(not s.wants_chunk() or s.error for s in sinks):
            return
    raise AssertionError("engine did not finish")


def test_unbatched_engine_equals_each_stream_alone_bit_for_bit(tiny_bundle, one_thread) -> None:
    engine = Engine(tiny_bundle.dit, batch=False)
    sinks = [Collect(5) for _ in CONFIGS]
    for i, (cfg, prompt, sink) in enumerate(zip(CONFIGS, PROMPTS, sinks)):
        engine.add(f"s{i}", FrameStream(tiny_bundle, prompt, cfg), sink)
    run(engine, sinks)
    for cfg, prompt, sink in zip(CONFIGS, PROMPTS, sinks):
        assert torch.equal(sink.latents, alone(tiny_bundle, cfg, prompt, 5)), cfg
    assert engine.batched_calls == 0


def test_batched_engine_shares_forwards_and_stays_within_5e_5(tiny_bundle, one_thread) -> None:
    engine = Engine(tiny_bundle.dit, batch=True)
    sinks = [Collect(5) for _ in CONFIGS]
    streams = [FrameStream(tiny_bundle, prompt, cfg) for cfg, prompt in zip(CONFIGS, PROMPTS)]
    for i, (fs, sink) in enumerate(zip(streams, sinks)):
        engine.add(f"s{i}", fs, sink)
    run(engine, sinks)
    calls = sum(fs.stream.dit_calls for fs in streams)
    assert engine.batched_calls > 0
    assert engine.forwards < calls  # several streams' calls ran in one forward
    for cfg, prompt, sink in zip(CONFIGS, PROMPTS, sinks):
        assert (sink.latents - alone(tiny_bundle, cfg, prompt, 5)).abs().max() <= 5e-5, cfg


def test_a_failing_stream_fails_alone(tiny_bundle, one_thread) -> None:
    """A `full` cache that overflows raises in its own stream; the batch it shared goes on."""
    good_cfg = CONFIGS[1]
    bad_cfg = {"policy": "full", "policy_settings": {"capacity_frames": 6}}
    engine = Engine(tiny_bundle.dit, batch=True)
    good, bad = Collect(5), Collect(5)
    bad_req = engine.add("bad", FrameStream(tiny_bundle, "a red circle", bad_cfg), bad)
    engine.add("good", FrameStream(tiny_bundle, PROMPTS[1], good_cfg), good)
    run(engine, [good, bad])
    assert bad.error is not None and bad_req.state is RequestState.FAILED and len(bad.chunks) == 2
    assert bad_req.closed.done()
    assert (good.latents - alone(tiny_bundle, good_cfg, PROMPTS[1], 5)).abs().max() <= 5e-5


def test_pause_stops_chunks_and_a_reset_while_paused_is_acknowledged(tiny_bundle, one_thread) -> None:
    engine = Engine(tiny_bundle.dit)
    sink = Collect(100)
    fs = FrameStream(tiny_bundle, "a red circle", CONFIGS[1])
    req = engine.add("s", fs, sink)
    for _ in range(8):
        engine.step()
    engine.pause(req)
    engine.step()  # the pause lands between ticks; a chunk in progress finishes
    while req.calls is not None:
        engine.step()
    made = len(sink.chunks)
    for _ in range(5):
        assert not engine.step()
    assert len(sink.chunks) == made and req.state is RequestState.PAUSED
    fs.reset(tag="r1")
    while len(sink.chunks) == made:
        assert engine.step()
    assert [(a.of, a.frame, a.tag) for a in sink.chunks[-1].acks] == [("reset", 0, "r1")]
    assert sink.chunks[-1].first_frame == 0
    assert not engine.step()  # still paused after the reset landed
    engine.resume(req)
    assert engine.step()
    closed = engine.remove(req)
    engine.step()  # events land between ticks
    assert closed.result(timeout=1) is RequestState.FINISHED and not engine.requests


@pytest.mark.parametrize("schedule", ["exact", "timestep-slot"])
def test_every_control_gets_its_own_ack_with_its_tag(tiny_bundle, one_thread, schedule) -> None:
    """A burst of resets, prompts and params: one ack each, carrying its own tag, in order per kind —
    also while the timestep-slot pipeline is filling (several chunks start inside one call)."""
    cfg = {"policy": "ema_sink", "schedule": schedule}
    fs = FrameStream(tiny_bundle, "a red circle", cfg)
    fs.reset(tag=1)
    fs.reset(tag=2)
    fs.set_prompt("a blue square", Transition("recache"), tag="p1")
    fs.set_params("seed", seed=9)
    chunks = [fs.next() for _ in range(2)]
    fs.reset(tag=3)
    fs.set_prompt("a green circle", Transition("blend", 2), tag="p2")
    fs.reset(tag=4)
    chunks += [fs.next() for _ in range(3)]
    acks = [(a.of, a.tag) for c in chunks for a in c.acks]
    assert sorted(acks, key=str) == sorted([("reset", 1), ("reset", 2), ("prompt", "p1"), ("params", "seed"),
                                            ("reset", 3), ("prompt", "p2"), ("reset", 4)], key=str)
    assert [t for of, t in acks if of == "reset"] == [1, 2, 3, 4]


def test_chunk_inputs_are_taken_once_per_chunk(tiny_bundle, one_thread) -> None:
    fs = FrameStream(tiny_bundle, "a red circle", {"policy": "ema_sink", "schedule": "timestep-slot"})
    taken: list[int] = []
    inputs = fs.stream._inputs
    fs.stream._inputs = lambda j: (taken.append(j), inputs(j))[1]
    for _ in range(3):
        fs.next()
    assert taken == sorted(set(taken)) and len(taken) == fs.stream.execution.started
