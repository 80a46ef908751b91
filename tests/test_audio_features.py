"""wav2vec2 audio features for LiveAvatar (spec/avatar.md §2.4 steps 1–3, §4): a tiny random-weight wav2vec2 saved
to a local directory the way the reference's checkpoint is (`Wav2Vec2ForCTC` + processor config), the whole-file
chain to video frames, the streaming window (causality, push-size invariance, bounded memory) and streamed vs
whole-file features on real espeak-ng speech."""
from __future__ import annotations

import json
import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the [avatar] extra (transformers) is not installed")

from streamgen.models.s2v.wav2vec import (  # noqa: E402
    SAMPLE_RATE,
    StreamingAudioFeatures,
    Wav2Vec2AudioFeatures,
    as_audio_emb,
    check_audio,
    frames_with_audio,
    load_audio,
    reference_num_frames,
    resample,
    video_frame_rows,
    video_rate_frames,
    wav2vec_frames,
)

ESPEAK = shutil.which("espeak-ng")
SENTENCE = ("The quick brown fox jumps over the lazy dog while a streaming avatar listens to every word and moves "
            "its lips in time with the voice, one chunk after another, without ever seeing the whole file at once.")
LAYERS, DIM = 3, 32  # tiny model: 2 transformer layers + the embedding output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny `Wav2Vec2ForCTC` (the reference's class; xlsr-53's stable-layer-norm layout, 128-tap positional conv)
    and its processor config, saved with save_pretrained."""
    cfg = transformers.Wav2Vec2Config(
        hidden_size=DIM, num_hidden_layers=LAYERS - 1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, do_stable_layer_norm=True, feat_extract_norm="layer", vocab_size=8)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wav2vec2-tiny")
    transformers.Wav2Vec2ForCTC(cfg).eval().save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder(model_dir) -> Wav2Vec2AudioFeatures:
    return Wav2Vec2AudioFeatures.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> torch.Tensor:
    """~11 s of espeak-ng speech (22,050 Hz mono), loaded the reference's way: resampled to 16 kHz."""
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed (needed for the real-speech comparison)")
    wav = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([ESPEAK, "-w", str(wav), SENTENCE], check=True, capture_output=True, timeout=60)
    with wave.open(str(wav)) as f:
        assert (f.getframerate(), f.getnchannels()) == (22050, 1)
    audio = load_audio(wav)
    assert audio.dtype == torch.float32 and audio.ndim == 1 and audio.shape[0] > 9 * SAMPLE_RATE
    return audio


def _noise(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(int(seconds * SAMPLE_RATE), generator=g)


def _stream(enc, audio, pushes=(SAMPLE_RATE // 10,), **kwargs):
    """All chunks of one stream: audio pushed in slices cycling through `pushes` sizes, then flush."""
    s = StreamingAudioFeatures(enc, **kwargs)
    chunks, i, n, peak = [], 0, 0, 0
    while i < audio.shape[0]:
        size = pushes[n % len(pushes)]
        chunks += s.push(audio[i:i + size])
        peak = max(peak, s.buffered_samples)
        i, n = i + size, n + 1
    return chunks, chunks + s.flush(), peak, s


# ----------------------------------------------------------------------------------------------- whole file


def test_alignment_formulas() -> None:
    """spec §4: N samples → floor((N−400)/320)+1 frames (16000 → 49); §2.4: T30 = int(T50/50·30), frame k → row
    round(k·30/25) (the reference's linspace of start times, rounded), one clip = 48 frames."""
    assert [wav2vec_frames(n) for n in (399, 400, 719, 720, 16000)] == [0, 1, 1, 2, 49]
    assert video_rate_frames(49) == 29 and video_rate_frames(1) == 0
    assert video_frame_rows(10) == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]
    n = 480
    linspace_rows = np.round(np.linspace(0, n / 25, n, endpoint=False) * 30).astype(int).tolist()
    assert video_frame_rows(n) == linspace_rows
    assert frames_with_audio(29) == 24  # row round(1.2·24) = 29 is past the 29 rows of 1 s
    assert reference_num_frames(29) == 48 and reference_num_frames(58) == 96  # int(T30 / 57.6) + 1 clips


def test_whole_file_matches_the_reference_chain(model_dir, encoder) -> None:
    """The local-dir loader gives the reference's all-hidden-states tensor; the video-frame features are the
    50 → 30 Hz align_corners interpolation sampled at round(k·30/25), zeros past the end."""
    audio = _noise(1.0)
    ctc = transformers.Wav2Vec2ForCTC.from_pretrained(model_dir, local_files_only=True).eval()
    processor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(model_dir, local_files_only=True)
    values = processor(audio.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    with torch.inference_mode():
        ref = torch.cat(ctc(values, output_hidden_states=True).hidden_states)  # [layers, T50, dim]
    hidden = encoder.hidden_states(audio)
    assert hidden.shape == (LAYERS, 49, DIM) == ref.shape
    torch.testing.assert_close(hidden, ref, atol=1e-6, rtol=0)

    feats = encoder(audio)
    assert feats.shape == (24, LAYERS, DIM)  # frames with audio: 0..23
    ref30 = F.interpolate(ref.transpose(1, 2), size=29, mode="linear", align_corners=True).transpose(1, 2)
    rows = np.round(np.linspace(0, 24 / 25, 24, endpoint=False) * 30).astype(int)
    torch.testing.assert_close(feats, ref30[:, rows].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(feats[0], ref[:, 0], atol=1e-6, rtol=0)  # align_corners: first row = first frame

    # "nominal": the same rows at their nominal 50 Hz positions i·5/3 (frame 5 = row 6 = wav2vec frame 10 = 200 ms)
    nominal = encoder(audio, alignment="nominal")
    assert nominal.shape == feats.shape
    pos = torch.tensor(rows, dtype=torch.float64) * 5 / 3
    lo = pos.floor().long()
    w = (pos - lo).float()[:, None, None]
    manual = ref[:, lo].transpose(0, 1) * (1 - w) + ref[:, lo + 1].transpose(0, 1) * w
    torch.testing.assert_close(nominal, manual, atol=1e-6, rtol=0)
    assert torch.equal(nominal[5], hidden[:, 10]) and torch.equal(nominal[0], feats[0])
    with pytest.raises(ValueError, match="alignment 'bogus'"):
        encoder(audio, alignment="bogus")

    padded = encoder(audio, num_frames=reference_num_frames(29))
    assert padded.shape == (48, LAYERS, DIM)
    assert torch.equal(padded[:24], feats) and not padded[24:].any()  # the reference's zero vectors
    assert as_audio_emb(padded).shape == (1, LAYERS, DIM, 48)  # [B, layers, audio_dim, T] of CausalAudioEncoder


def test_clear_errors(tmp_path, encoder) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*model_type 'wav2vec2'"):
        Wav2Vec2AudioFeatures.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json; expected a local Hugging Face wav2vec2"):
        Wav2Vec2AudioFeatures.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"model_type 't5', not 'wav2vec2'"):
        Wav2Vec2AudioFeatures.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(FileNotFoundError, match=r"no weights.*model.safetensors"):
        Wav2Vec2AudioFeatures.from_pretrained(empty)

    audio = _noise(0.5)
    with pytest.raises(ValueError, match=r"22050 Hz.*expect 16000 Hz mono.*resample"):
        encoder(audio, sample_rate=22050)
    for stereo in (torch.stack([audio, audio]), torch.stack([audio, audio], dim=1)):
        with pytest.raises(ValueError, match=r"expected mono samples of shape \[N\]"):
            encoder(stereo)
    with pytest.raises(ValueError, match=r"expected float samples"):
        check_audio((audio * 32767).to(torch.int16))
    with pytest.raises(ValueError, match=r"at least 400"):
        encoder(audio[:399])
    stream = StreamingAudioFeatures(encoder)
    with pytest.raises(ValueError, match=r"48000 Hz.*16000 Hz"):
        stream.push(audio, sample_rate=48000)
    with pytest.raises(ValueError, match=r"mono"):
        stream.push(torch.stack([audio, audio]))
    with pytest.raises(ValueError, match=r"lookahead_frames must be ≥ 1"):
        StreamingAudioFeatures(encoder, lookahead_frames=0)
    assert torch.equal(encoder(audio[None]), encoder(audio))  # [1, N] is mono


def test_resample_and_load(tmp_path) -> None:
    """22,050 Hz (espeak's rate) → 16 kHz: in-band tones kept, out-of-band ones removed, librosa's length; a
    stereo file is averaged to mono as librosa.load does."""
    sr, n = 22050, 22050
    t = np.arange(n) / sr
    for f, expect in ((440.0, True), (3000.0, True), (10000.0, False)):
        y = resample(np.sin(2 * np.pi * f * t), sr).double().numpy()
        assert y.shape == (int(np.ceil(n * 16000 / sr)),)
        ref = np.sin(2 * np.pi * f * np.arange(y.shape[0]) / 16000) if expect else 0.0
        assert np.abs(y - ref)[200:-200].max() < 1e-4, f
    assert torch.equal(resample(torch.ones(5), 16000), torch.ones(5))

    left, right = np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 500 * t)
    pcm = (np.stack([left, right], axis=1) * 16000).astype("<i2")
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2), f.setsampwidth(2), f.setframerate(sr)
        f.writeframes(pcm.tobytes())
    mono = load_audio(path)
    expect = resample(pcm.astype(np.float32).mean(axis=1) / 32768, sr)
    torch.testing.assert_close(mono, expect, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("alignment", ["nominal", "reference"])
def test_streaming_is_causal_deterministic_and_bounded(encoder, alignment) -> None:
    """Chunk k depends on audio before its end + look-ahead only: changing anything later leaves chunks ≤ k
    bit-identical; changing audio inside its look-ahead does change it. Push sizes do not matter; the buffer
    stays within the window."""
    audio = _noise(7.0, seed=1)
    kw = dict(chunk_frames=12, lookahead_frames=4, context_s=2.0, alignment=alignment)
    ready, chunks, peak, s = _stream(encoder, audio, **kw)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.start_frame == 12 * c.index for c in chunks)
    assert sum(c.features.shape[0] for c in chunks) == encoder(audio).shape[0]
    assert len(ready) == (7 * SAMPLE_RATE // 640 - 4) // 12  # push() emitted each chunk once its look-ahead came
    assert all(c.features.shape[1:] == (LAYERS, DIM) for c in chunks)
    step = 12 * 640
    assert peak <= s.context_samples + s.grid_samples + 2 * step  # never the whole stream
    assert s.lookahead_ms == 160.0

    k = 5
    cut = ((k + 1) * 12 + 4) * 640  # chunk k's end + look-ahead, in samples
    changed = audio.clone()
    changed[cut:] = _noise(7.0, seed=2)[cut:]
    _, other, _, _ = _stream(encoder, changed, pushes=(997, 6400, 123), **kw)
    for a, b in zip(chunks[:k + 1], other[:k + 1]):
        assert torch.equal(a.features, b.features), a.index
    assert not torch.equal(chunks[k + 1].features, other[k + 1].features)

    inside = audio.clone()
    inside[cut - 320:cut] = 0.0  # the last 20 ms of chunk k's look-ahead
    _, third, _, _ = _stream(encoder, inside, **kw)
    assert all(torch.equal(a.features, b.features) for a, b in zip(chunks[:k], third[:k]))
    assert not torch.equal(chunks[k].features, third[k].features)

    _, again, _, _ = _stream(encoder, audio, pushes=(audio.shape[0],), **kw)  # one push of everything
    assert all(torch.equal(a.features, b.features) for a, b in zip(chunks, again))


def test_streaming_vs_whole_file_on_speech(encoder, speech) -> None:
    """Streamed vs whole-file features on real speech. Reported: the default stream (8 s context, 160 ms
    look-ahead, nominal rows) against the reference's whole-file features, and what each part costs. Asserted:
    finite; a window and look-ahead covering the whole utterance reproduce the whole-file features (both
    alignments) within 1e-5."""
    reference = encoder(speech)
    nominal = encoder(speech, alignment="nominal")
    scale = reference.abs().mean().item()
    seconds = speech.shape[0] / SAMPLE_RATE
    print(f"\n{seconds:.2f} s espeak-ng speech, {reference.shape[0]} frames, tiny random wav2vec2 "
          f"({LAYERS} hidden states × {DIM}); mean|feature| {scale:.4g}; nominal vs reference rows, whole file: "
          f"max|Δ| {(nominal - reference).abs().max():.4g}, mean|Δ| {(nominal - reference).abs().mean():.4g}")

    def compare(label, whole, **kwargs):
        _, chunks, peak, _ = _stream(encoder, speech, pushes=(320, 4000, 16000), **kwargs)
        streamed = torch.cat([c.features for c in chunks])
        assert streamed.shape == whole.shape
        delta = (streamed - whole).abs()
        cos = F.cosine_similarity(streamed, whole, dim=-1).mean().item()
        print(f"[{label}] max|Δ| {delta.max():.4g}, mean|Δ| {delta.mean():.4g}, mean cosine {cos:.4f}, "
              f"peak buffer {peak / SAMPLE_RATE:.2f} s")
        assert torch.isfinite(delta).all()
        return delta

    default = compare("default stream vs whole file (reference)", reference)
    assert default.max() > 0
    compare("default stream vs whole file (nominal rows): context effect only", nominal)
    compare("stream with reference rows per window vs whole file (reference)", reference, alignment="reference")
    for lookahead in (12, 32):
        compare(f"look-ahead {lookahead} frames vs whole file (reference)", reference, lookahead_frames=lookahead)
    everything = dict(context_s=seconds + 1, lookahead_frames=int(seconds * 25) + 1)
    for alignment, whole in (("nominal", nominal), ("reference", reference)):
        full = compare(f"window + look-ahead cover the utterance, {alignment}", whole, alignment=alignment,
                       **everything)
        assert full.max() <= 1e-5
