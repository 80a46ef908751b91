"""The audio-driven LiveAvatar stream (`engine/avatar_stream.py`) on the live_avatar fixture's tiny S2V DiT: fixture
parity chunk by chunk (both sink variants, the recorded noise and rd draws injected), one block loop with the parity
runner, determinism, causality, silence when the audio is late, audio spans that tile the input (features and
16 kHz samples through a tiny wav2vec2), the A/V lead-in against the decoders' frame mapping, and input errors."""
from __future__ import annotations

import threading

import pytest
import torch

from streamgen.engine.avatar_stream import AudioSpan, AvatarStream, AvatarStreamConfig, SeededSinkDraws
from streamgen.models.decoders import WanVAEFrames
from streamgen.models.s2v import S2VConfig, S2VDiT
from streamgen.parity.common import Fixture
from streamgen.parity.live_avatar import build_model, run_variant
from streamgen.sampling.s2v_blocks import EulerSchedule, RecordedSinkDraws

from .conftest import FIXTURES

FIXTURE = FIXTURES / "live_avatar"
ATOL, RTOL = 1e-2, 2e-4  # the fixture README's tolerance with both dtype quirks emulated (as test_live_avatar)
BLOCKS_PER_CLIP, CHUNK = 4, 3
VIDEO = 12  # video frames per chunk
SPF = 640  # 16 kHz samples per 25 fps frame


@pytest.fixture(scope="module")
def fx() -> Fixture:
    return Fixture.open(FIXTURE)


@pytest.fixture(scope="module")
def model(fx, one_thread) -> S2VDiT:
    return build_model(fx)


class FixtureNoise:
    """The fixture's per-clip noise [3, C, 12, H, W], sliced per block as the reference loop does."""

    def __init__(self, noise: torch.Tensor) -> None:
        self.noise = noise

    def initial(self, block: int) -> torch.Tensor:
        r, b = divmod(block, BLOCKS_PER_CLIP)
        return self.noise[r][None, :, CHUNK * b:CHUNK * (b + 1)]


def fixture_features(fx) -> torch.Tensor:
    """audio_emb [1, layers, dim, frames] -> the stream's [frames, layers, dim]."""
    return fx.tensors["audio_emb"][0].permute(2, 0, 1)


def make_stream(fx, model, **kwargs) -> AvatarStream:
    t = fx.tensors
    return AvatarStream(model, t["context"], t["ref_latents"], t["motion_latents"], **kwargs)


def random_features(model, frames: int, seed: int) -> torch.Tensor:
    m = model.cfg
    return torch.randn(frames, m.audio_layers, m.audio_dim, generator=torch.Generator().manual_seed(seed))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_schedule_is_the_references(fx) -> None:
    s = EulerSchedule.flow_match(4, 3.0)
    assert torch.equal(s.timesteps, fx.tensors["sched.timesteps"]) and torch.equal(s.sigmas, fx.tensors["sched.sigmas"])


@pytest.mark.parametrize("variant, swap_block", [("A", None), ("B", BLOCKS_PER_CLIP)])
def test_reproduces_the_fixture_chunk_by_chunk(fx, model, variant, swap_block) -> None:
    """Fixture audio pushed as features, its noise and rd draws injected, the reference's indexing (no lead-in):
    every chunk matches the fixture's latents, and the whole run equals the parity runner's bit for bit."""
    t = fx.tensors
    cfg = AvatarStreamConfig(lead_in_frames=0, cond_tokens=int(fx.config["cond_cache_capacity_tokens"]),
                             sink_swap_block=swap_block)
    stream = make_stream(fx, model, config=cfg, noise=FixtureNoise(t["noise"]),
                         sink_draws=RecordedSinkDraws(t["rope_rd_draws"].tolist(), 4))
    features = fixture_features(fx)
    stream.push_audio(features)
    expected = t[f"{variant}.final_latents"]  # [C, F, H, W]
    chunks = []
    for g in range(int(fx.config["total_blocks"])):
        chunk = stream.next_chunk()
        assert (chunk.index, chunk.first_frame, chunk.video_frames) == (g, CHUNK * g, range(VIDEO * g, VIDEO * (g + 1)))
        assert chunk.audio == AudioSpan(range(VIDEO * g, VIDEO * (g + 1)), range(VIDEO * g * SPF, VIDEO * (g + 1) * SPF), 0, 0)
        got, want = chunk.latents[0].transpose(0, 1), expected[:, CHUNK * g:CHUNK * (g + 1)]
        assert rel_l2(got, want) <= RTOL and torch.allclose(got, want, atol=ATOL, rtol=0), g
        chunks.append(got)
    with torch.no_grad():
        runner = run_variant(fx, model, variant, {1} if swap_block else set())[f"{variant}.final_latents"]
    assert torch.equal(torch.cat(chunks, dim=1), runner)  # one block loop: S2VBlockSampler
    assert stream.queued_frames == 0 and stream.received_frames == features.shape[0]


def run(stream: AvatarStream, n: int) -> list:
    return [stream.next_chunk() for _ in range(n)]


def test_same_seed_same_audio_same_latents(fx, model) -> None:
    audio = random_features(model, 40, seed=1)
    a, b, c = (make_stream(fx, model, seed=s) for s in (7, 7, 8))
    for s in (a, b, c):
        s.push_audio(audio)
    ra, rb, rc = run(a, 3), run(b, 3), run(c, 3)
    assert all(torch.equal(x.latents, y.latents) and x.audio == y.audio for x, y in zip(ra, rb))
    assert not torch.allclose(ra[0].latents, rc[0].latents)  # the seed matters (noise and sink draws)


def test_changing_later_audio_leaves_earlier_chunks_alone(fx, model) -> None:
    """Causality: audio for chunk k + 1 = 2 changes nothing in chunks 0..1, and does change chunk 2."""
    audio = random_features(model, 9 + 3 * VIDEO, seed=2)
    changed = audio.clone()
    changed[9 + VIDEO:9 + 2 * VIDEO] = random_features(model, VIDEO, seed=3)  # chunk 2's input frames (lead-in 3)
    a, b = make_stream(fx, model), make_stream(fx, model)
    a.push_audio(audio)
    b.push_audio(changed)
    ra, rb = run(a, 4), run(b, 4)
    assert ra[2].audio.frames == range(9 + VIDEO, 9 + 2 * VIDEO)
    assert all(torch.equal(ra[k].latents, rb[k].latents) for k in (0, 1))
    assert not torch.allclose(ra[2].latents, rb[2].latents)


def test_no_audio_yet_is_silence_and_marked(fx, model) -> None:
    """A chunk whose audio has not arrived is generated from zero features at once (never waits), consumes
    nothing, and says so; the audio that arrives later is spoken by the next chunk, from its first frame."""
    late = make_stream(fx, model)
    first = late.next_chunk()
    assert first.silent and first.audio == AudioSpan(range(0, 0), range(0, 0), 3, 9)
    assert late.next_chunk(wait_s=0.01).silent  # a bounded wait that nothing ends early
    zeros = make_stream(fx, model)  # the same first block fed explicit zero features
    zeros.push_audio(torch.zeros(9, model.cfg.audio_layers, model.cfg.audio_dim))
    assert torch.equal(zeros.next_chunk().latents, first.latents)
    late.push_audio(random_features(model, VIDEO, seed=4))
    spoken = late.next_chunk()
    assert not spoken.silent and spoken.audio.frames == range(0, VIDEO) and spoken.audio.samples == range(0, VIDEO * SPF)


def test_partial_block_waits_for_more_audio_or_the_end(fx, model) -> None:
    stream = make_stream(fx, model, config=AvatarStreamConfig(lead_in_frames=0))
    stream.push_audio(random_features(model, 5, seed=5))
    assert stream.next_chunk().silent and stream.queued_frames == 5  # kept, not skipped
    stream.end_audio()
    tail = stream.next_chunk()
    assert tail.audio == AudioSpan(range(0, 5), range(0, 5 * SPF), 0, 7) and stream.queued_frames == 0
    assert stream.next_chunk().silent


def test_waiting_next_chunk_gets_audio_pushed_from_another_thread(fx, model) -> None:
    stream = make_stream(fx, model)
    pusher = threading.Thread(target=stream.push_audio, args=(random_features(model, VIDEO, seed=6),))
    pusher.start()
    chunk = stream.next_chunk(wait_s=60)  # returns as soon as the block's 9 frames are there
    pusher.join()
    assert chunk.audio.frames == range(0, 9)


def check_tiling(chunks: list, frames: int, samples: int) -> None:
    """Spans tile the input: frames [0, frames) and samples [0, samples), in order, no gap, no overlap;
    every chunk is lead + input + tail = 12 generated frames, the lead only on chunk 0."""
    frame_end = sample_end = 0
    for k, c in enumerate(chunks):
        a = c.audio
        assert a.frames.start == frame_end and a.samples.start == sample_end, (k, a)
        assert a.lead + len(a.frames) + a.tail == VIDEO and a.lead == (3 if k == 0 else 0)
        assert len(a.samples) == 0 if a.silent else len(a.samples) > 0
        frame_end, sample_end = a.frames.stop, a.samples.stop
    assert (frame_end, sample_end) == (frames, samples)


def test_feature_spans_tile_the_input(fx, model) -> None:
    stream = make_stream(fx, model)
    chunks, total = [], 0
    for n, calls in ((7, 1), (20, 2), (3, 1), (30, 1)):  # pushes and chunk calls interleaved, some silent
        stream.push_audio(random_features(model, n, seed=n))
        total += n
        chunks += run(stream, calls)
    stream.end_audio()
    while stream.queued_frames:
        chunks.append(stream.next_chunk())
    check_tiling(chunks, total, total * SPF)
    assert any(c.silent for c in chunks) and not chunks[-1].silent


def test_lead_in_pairs_decoded_frames_with_their_audio(fx, model) -> None:
    """The reference shows video 3 frames (120 ms) early (spec §2.9). With the default lead-in, the decoders'
    frame d (WanVAEFrames/TAEHVFrames: latent f -> frames from 4f − 3, the first latent 1 frame) is generated
    frame d + 3, driven by input frame d: decoded frame d plays with input samples [640 d, 640 (d + 1))."""
    stream = make_stream(fx, model)
    stream.push_audio(random_features(model, 40, seed=9))
    chunks = run(stream, 3)
    for c in chunks:
        for f in range(c.first_frame, c.first_frame + CHUNK):
            first_decoded = WanVAEFrames.video_frame(None, f)  # the decoder's first frame of latent f
            frames = 1 if f == 0 else 4
            for d in range(first_decoded, first_decoded + frames):
                generated = d + 3
                assert c.audio.input_frame(generated - c.video_frames.start) == d
    assert chunks[0].audio.input_frame(0) is None  # the lead-in frames (never shown) are silence


@pytest.fixture(scope="module")
def tiny_wav2vec():
    transformers = pytest.importorskip("transformers", reason="the [avatar] extra (transformers) is not installed")
    from streamgen.models.s2v.wav2vec import Wav2Vec2AudioFeatures

    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(16,) * 7, do_stable_layer_norm=True,
                                      feat_extract_norm="layer", vocab_size=8)
    torch.manual_seed(0)
    return Wav2Vec2AudioFeatures(transformers.Wav2Vec2Model(cfg).eval())


def test_sample_spans_tile_the_input(fx, tiny_wav2vec) -> None:
    """16 kHz samples through `StreamingAudioFeatures` (segments whose length is no whole frame): the spans tile
    the samples exactly, and a second segment continues where the first ended."""
    from streamgen.models.s2v.wav2vec import StreamingAudioFeatures

    t, base = fx.tensors, S2VConfig.from_dict({**fx.config["model"], "audio_layers": 3, "motion_frames": 73})
    model = S2VDiT(base).eval()  # random weights, 3 wav2vec2 layers
    enc = StreamingAudioFeatures(tiny_wav2vec, context_s=2.0)
    stream = AvatarStream(model, t["context"], t["ref_latents"], t["motion_latents"], audio_encoder=enc)
    gen = torch.Generator().manual_seed(0)
    chunks, total = [], 0
    for segment in (30_001, 9_999):
        audio = 0.1 * torch.randn(segment, generator=gen)
        for piece in audio.split(4_321):
            stream.push_audio(piece)
            chunks.append(stream.next_chunk())
        stream.end_audio()
        total += segment
        while stream.queued_frames:
            chunks.append(stream.next_chunk())
    frames = -(-30_001 // SPF) + -(-9_999 // SPF)
    check_tiling(chunks, frames, total)


def test_seeded_sink_draws() -> None:
    d = SeededSinkDraws(0, (4, 30))
    draws = [d(g, i) for g in range(100) for i in range(4)]
    assert draws == [SeededSinkDraws(0, (4, 30))(g, i) for g in range(100) for i in range(4)]
    assert min(draws) == 4 and max(draws) == 30 and len(set(draws)) == 27
    assert draws != [SeededSinkDraws(1, (4, 30))(g, i) for g in range(100) for i in range(4)]


def test_from_image_encodes_reference_and_motion(fx, model) -> None:
    calls = []

    def encode(video: torch.Tensor) -> torch.Tensor:  # a VAE-like stand-in: 1 + (T − 1)/4 latents, 8x down
        calls.append(video.shape[2])
        frames = 1 + (video.shape[2] - 1) // 4
        pooled = torch.nn.functional.avg_pool2d(video[0].transpose(0, 1), 8)  # [T, 3, h, w]
        lat = pooled.mean(1, keepdim=True).expand(-1, 16, -1, -1)[:frames]
        return (lat + torch.arange(frames)[:, None, None, None]).transpose(0, 1)[None]

    image = torch.rand(3, 64, 64) * 2 - 1
    stream = AvatarStream.from_image(model, fx.tensors["context"], image, encode)
    assert calls == [5, 73] and stream.motion.shape == (1, 16, 19, 8, 8)
    assert torch.equal(stream.reference, encode(image[None, :, None].expand(1, 3, 5, 64, 64))[:, :, 1:2])
    with pytest.raises(ValueError, match=r"expected \[3, H, W\]"):
        AvatarStream.from_image(model, fx.tensors["context"], image[0], encode)


def test_bad_input_names_what_is_expected(fx, model) -> None:
    t = fx.tensors
    stream = make_stream(fx, model)
    with pytest.raises(ValueError, match=r"expected \[frames, 25, 32\]"):
        stream.push_audio(torch.zeros(12, 24, 32))
    with pytest.raises(ValueError, match=r"expected \[frames, 25, 32\]"):
        stream.push_features(torch.zeros(12, 25))
    with pytest.raises(ValueError, match="finite"):
        stream.push_audio(torch.full((12, 25, 32), float("nan")))
    with pytest.raises(ValueError, match="features .* or mono samples"):
        stream.push_audio(torch.zeros(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="needs an audio_encoder"):
        stream.push_audio(torch.zeros(16000))
    ref, motion, ctx = t["ref_latents"], t["motion_latents"], t["context"]
    with pytest.raises(ValueError, match=r"expected the reference image's latent \[1, 16, 1, H, W\]"):
        AvatarStream(model, ctx, ref[:, :8], motion)
    with pytest.raises(ValueError, match=r"expected the reference image's latent \[1, 16, 1, H, W\]"):
        AvatarStream(model, ctx, ref.expand(1, 16, 2, 8, 8), motion)
    with pytest.raises(ValueError, match=r"even and ≥ 8"):
        AvatarStream(model, ctx, ref[..., :7, :], motion)
    with pytest.raises(ValueError, match=r"expected \[1, 16, T, 8, 8\]"):
        AvatarStream(model, ctx, ref, motion[..., :4])
    with pytest.raises(ValueError, match=r"expected the encoded prompt \[rows, 32\]"):
        AvatarStream(model, ctx[:, :16], ref, motion)
    with pytest.raises(ValueError, match=r"silence features .* expected one frame \[25, 32\]"):
        AvatarStream(model, ctx, ref, motion, silence=torch.zeros(32))
    with pytest.raises(ValueError, match="cannot hold the 40 cond tokens"):
        AvatarStream(model, ctx, ref, motion, config=AvatarStreamConfig(cond_tokens=39))
    with pytest.raises(ValueError, match="ring_frames 10 must be a positive multiple"):
        AvatarStreamConfig(ring_frames=10)
    with pytest.raises(ValueError, match="lead_in_frames 12"):
        AvatarStreamConfig(lead_in_frames=12)
    full = make_stream(fx, model, config=AvatarStreamConfig(max_queued_frames=20))
    with pytest.raises(BufferError, match="max_queued_frames 20"):
        full.push_audio(random_features(model, 21, seed=0))


def test_rope_table_end_is_a_clear_error(fx) -> None:
    cfg = S2VConfig.from_dict({**fx.config["model"], "audio_layers": 25, "motion_frames": 73, "rope_max_frames": 40})
    model = S2VDiT(cfg).eval()
    t = fx.tensors
    stream = AvatarStream(model, t["context"], t["ref_latents"], t["motion_latents"])
    run(stream, 4)  # block 3 at latent frame 9: the reference at ≤ 9 + 30, row 39 of 40
    with pytest.raises(RuntimeError, match="RoPE rows up to 43, the table has 40"):
        stream.next_chunk()
