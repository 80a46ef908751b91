"""Audio-driven streams (engine/driven.py): the reference is the cache's sink, each chunk takes exactly its
frames' audio without waiting, the samples travel with the frames, and the engine loop batches driven
streams like any other (bit for bit unbatched, ≤ 5e-5 batched). A random-weight model: these are
properties of the machinery, not of the trained weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamgen.avatar_world import SAMPLES_PER_FRAME, babble
from streamgen.bundles.embedded_avatar import AvatarModel, bundle_from_model
from streamgen.engine.driven import AudioBuffer, AudioOverflowError, use_drive
from streamgen.engine.frame_stream import FrameStream
from streamgen.engine.scheduler import Engine
from streamgen.errors import InputError

from .test_scheduler import Collect, run

DISC = np.zeros((48, 48, 3), np.uint8)
DISC[(np.mgrid[:48, :48][0] - 24) ** 2 + (np.mgrid[:48, :48][1] - 24) ** 2 <= 20 ** 2] = (220, 60, 20)
CHUNK_SAMPLES = 3 * SAMPLES_PER_FRAME


@pytest.fixture(scope="module")
def avatar_bundle():
    torch.manual_seed(0)
    return bundle_from_model(AvatarModel().eval().requires_grad_(False))


def driven(bundle, audio: np.ndarray | None, seed: int = 0, capacity: int | None = None) -> tuple[FrameStream, AudioBuffer]:
    fs = FrameStream(bundle, "", {"seed": seed})
    buf = AudioBuffer(16000, capacity)
    use_drive(fs.stream, buf, bundle.avatar, DISC)
    if audio is not None:
        buf.push(audio)
    return fs, buf


def test_the_reference_is_the_sink_and_chunks_follow_it(avatar_bundle, one_thread) -> None:
    fs, _ = driven(avatar_bundle, babble(1, 2.0))
    cache = fs.stream.execution.caches[0]
    first = fs.next()
    assert first.first_frame == 0 and first.frames.shape == (3, 32, 32, 3)
    assert cache.global_end == 4  # the reference at cache frame 0, chunk 0 at 1…3
    sink = [k[:, :cache.tokens_per_frame].clone() for k in cache.k]
    for _ in range(4):
        fs.next()
    assert cache.global_end == 16 and cache.local_end == 7  # 1 + 5 chunks written; the window: sink + 2 chunks
    assert all(torch.equal(k[:, :cache.tokens_per_frame], s) for k, s in zip(cache.k, sink))


def test_each_chunk_carries_exactly_the_samples_that_drove_it(avatar_bundle, one_thread) -> None:
    audio = babble(2, 1.0)  # 16 frames of audio: the sixth chunk runs past its end
    fs, buf = driven(avatar_bundle, audio)
    chunks = [fs.next() for _ in range(7)]
    played = torch.cat([c.audio for c in chunks]).numpy()
    assert all(len(c.audio) == CHUNK_SAMPLES for c in chunks)
    assert np.array_equal(played[:len(audio)], audio) and not played[len(audio):].any()
    assert buf.counts["played"] == len(audio) and buf.counts["filled"] == 7 * CHUNK_SAMPLES - len(audio)
    assert fs.stream.execution.late_chunks == 2  # chunk 5 partly, chunk 6 wholly silence


def test_late_audio_never_blocks_and_the_avatar_idles(avatar_bundle, one_thread) -> None:
    fs, buf = driven(avatar_bundle, None)
    chunk = fs.next()  # nothing pushed: generated from silence, at once
    assert not chunk.audio.any() and buf.counts["filled"] == CHUNK_SAMPLES
    buf.push(babble(3, 0.5))
    assert fs.next().audio.any()  # audio arriving later drives the next chunk


def test_the_buffer_is_bounded_with_a_clear_error_and_clear_interrupts(avatar_bundle) -> None:
    fs, buf = driven(avatar_bundle, None, capacity=16000)
    buf.push(np.zeros(12000, np.float32))
    with pytest.raises(AudioOverflowError, match="ahead of the video"):
        buf.push(np.zeros(8000, np.float32))
    assert buf.held == 12000  # the refused push lost nothing
    assert buf.clear() == 12000 and buf.held == 0 and buf.counts["dropped"] == 12000
    with pytest.raises(InputError, match="finite"):
        buf.push(np.array([np.nan], np.float32))


def test_same_seed_and_audio_give_the_same_latents_and_a_reset_keeps_the_reference(avatar_bundle, one_thread) -> None:
    audio = babble(4, 2.0)
    a, _ = driven(avatar_bundle, audio, seed=3)
    b, _ = driven(avatar_bundle, audio, seed=3)
    la = torch.cat([a.next().latents for _ in range(3)], dim=1)
    assert torch.equal(la, torch.cat([b.next().latents for _ in range(3)], dim=1))
    c, buf = driven(avatar_bundle, audio[:CHUNK_SAMPLES], seed=3)
    first = c.next().latents
    c.stream.reset()
    buf.push(audio[:CHUNK_SAMPLES])
    again = c.next()
    assert again.first_frame == 0 and c.stream.execution.caches[0].global_end == 4
    assert torch.equal(again.latents, first)  # same reference, same audio, same seed, from frame 0


def test_the_engine_loop_batches_driven_streams(avatar_bundle, one_thread) -> None:
    audios = [babble(10 + i, 2.0) for i in range(3)]

    def engine_latents(batch: bool) -> list[torch.Tensor]:
        engine = Engine(avatar_bundle.dit, batch=batch)
        sinks = [Collect(4) for _ in audios]
        for i, (audio, sink) in enumerate(zip(audios, sinks)):
            engine.add(f"a{i}", driven(avatar_bundle, audio, seed=i)[0], sink)
        run(engine, sinks)
        assert (engine.batched_calls > 0) == batch
        return [s.latents for s in sinks]

    alone = []
    for i, audio in enumerate(audios):
        fs, _ = driven(avatar_bundle, audio, seed=i)
        alone.append(torch.cat([fs.next().latents for _ in range(4)], dim=1))
    assert all(torch.equal(x, y) for x, y in zip(engine_latents(False), alone))
    assert all((x - y).abs().max() <= 5e-5 for x, y in zip(engine_latents(True), alone))


def test_a_driven_stream_needs_the_exact_schedule_and_a_usable_reference(avatar_bundle) -> None:
    fs = FrameStream(avatar_bundle, "", {"schedule": "timestep-slot"})
    with pytest.raises(InputError, match="exact"):
        use_drive(fs.stream, AudioBuffer(16000, None), avatar_bundle.avatar, DISC)
    with pytest.raises(InputError, match="reference picture"):
        use_drive(FrameStream(avatar_bundle, "").stream, AudioBuffer(16000, None), avatar_bundle.avatar,
                  np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError, match="16000 Hz"):
        use_drive(FrameStream(avatar_bundle, "").stream, AudioBuffer(48000, None), avatar_bundle.avatar, DISC)
