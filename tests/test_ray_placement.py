"""Session placement (`RayBackend(mode="placement")`) on a real local Ray cluster: whole exact streams
on worker actors equal the local stream; least-loaded placement with a memory budget; drain and a
killed worker move streams, which resume from driver-kept latents (re-cache) and report the stall."""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from streamgen.backends.base import CapacityError  # noqa: E402
from streamgen.backends.ray.backend import RayBackend  # noqa: E402
from streamgen.backends.ray.placement import PlacementConfig, capture, restore  # noqa: E402
from streamgen.engine.frame_stream import FrameStream  # noqa: E402

from .hang_guard import returns  # noqa: E402


def placement_backend(tiny_bundle) -> RayBackend:
    return RayBackend(tiny_bundle, "placement", address=None,
                      placement=PlacementConfig(model="tiny-random", workers=2, worker_resources={"num_cpus": 0.5},
                                                threads=1, call_timeout_s=10, recover_timeout_s=60))


@pytest.fixture(scope="module")
def backend(ray_cluster, tiny_bundle):
    be = placement_backend(tiny_bundle)
    yield be
    be.shutdown()


@pytest.fixture
def own_backend(ray_cluster, tiny_bundle):
    """A backend of the test's own, for tests that leave a worker drained."""
    be = placement_backend(tiny_bundle)
    yield be
    be.shutdown()


def test_placed_streams_equal_local_streams(backend, tiny_bundle) -> None:
    a = backend.open("a red fox running", {"seed": 3})
    b = backend.open("a green frog jumping", {"seed": 4, "policy": "window_sink"})
    try:
        assert a.worker.index != b.worker.index  # least loaded: one stream per worker
        ra = FrameStream(tiny_bundle, "a red fox running", {"seed": 3})
        rb = FrameStream(tiny_bundle, "a green frog jumping", {"seed": 4, "policy": "window_sink"})
        for i in range(6):
            if i == 3:
                a.set_prompt("a blue whale swimming")
                ra.set_prompt("a blue whale swimming")
            for ours, ref in ((a.next(), ra.next()), (b.next(), rb.next())):
                assert ours.index == ref.index and ours.first_frame == ref.first_frame
                assert torch.equal(ours.latents, ref.latents) and torch.equal(ours.frames, ref.frames)
                assert ours.acks == ref.acks and ours.stall is None
        assert a.stream.prompt == "a blue whale swimming" and a.stream.frame == 18  # what the server's describe() reads
        stats = backend.stats()
        assert stats["streams"] == 2 and [w["streams"] for w in stats["workers"]] == [1, 1]
    finally:
        backend.close(a)
        backend.close(b)


def test_bad_prompt_and_capacity_are_refused(backend) -> None:
    with pytest.raises(ValueError, match="words"):
        backend.open(" ".join(["word"] * 40))
    s = backend.open("a red fox")
    try:
        with pytest.raises(ValueError, match="words"):
            s.set_prompt(" ".join(["word"] * 40))
        saved = backend.placement.cfg.memory_budget_bytes
        backend.placement.cfg.memory_budget_bytes = 1024
        try:
            with pytest.raises(CapacityError, match="no worker has room"):
                backend.open("a red fox")
        finally:
            backend.placement.cfg.memory_budget_bytes = saved
    finally:
        backend.close(s)


def test_drain_moves_streams_which_continue_like_a_local_resume(own_backend, tiny_bundle) -> None:
    """After drain the stream continues at the next chunk; what it produces is exactly a local stream
    resumed (re-cache from the same recent latents) at that point: the move is deterministic."""
    s = own_backend.open("a red fox running", {"seed": 5})
    try:
        ref = FrameStream(tiny_bundle, "a red fox running", {"seed": 5})
        for _ in range(5):
            assert torch.equal(s.next().latents, ref.next().latents)
        source = s.worker.index
        s.set_prompt("a blue whale swimming")  # queued after the last snapshot: replayed where it lands
        moved = own_backend.drain(source)
        assert s.sid in moved and s.worker.index != source
        assert own_backend.stats()["workers"][source]["streams"] == 0
        chunk = s.next()
        assert chunk.index == 5 and chunk.stall is not None and "drain" in chunk.stall["reason"]
        assert [a.of for a in chunk.acks] == ["prompt"]
        # the same resume, locally
        snap = capture(ref.stream, 0, None)
        local = FrameStream(tiny_bundle, "a red fox running", {"seed": 5})
        restore(local.stream, snap, list(ref.stream.execution.recent.chunks))
        local.stream.set_prompt("a blue whale swimming")
        assert torch.equal(chunk.latents, local.next().latents)
        assert torch.equal(s.next().latents, local.next().latents)
    finally:
        own_backend.close(s)


def test_killed_worker_is_replaced_and_its_streams_resume(backend) -> None:
    a = backend.open("a red fox running", {"seed": 6})
    b = backend.open("a green frog jumping", {"seed": 7})
    try:
        for _ in range(4):
            a.next()
            b.next()
        victim = a.worker
        others = [s for s in (a, b) if s.worker is victim]
        ray.kill(victim.actor)
        chunk = returns(a.next, hang_s=120)
        assert chunk.index == 4 and chunk.stall is not None and a.stalls == 1
        assert torch.isfinite(chunk.latents).all()
        for s in others[1:]:
            c = s.next()
            assert c.index == 4 and c.stall is not None
        assert backend.stats()["recoveries"] >= 1
        assert a.next().index == 5
    finally:
        backend.close(a)
        backend.close(b)
