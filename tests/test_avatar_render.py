"""`streamgen render --model embedded-avatar --audio … --reference …`: an H.264 + AAC MP4 as long as the
speech, its sound track the samples that drove the frames (decoded with PyAV), the avatar world's checker
on the decoded frames, and the refusals (exit 2, nothing written)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from streamgen.audio import load_audio
from streamgen.avatar_world import (
    SAMPLES_PER_FRAME,
    blink_schedule,
    identity_from_image,
    make_clip,
    score_clip,
)
from streamgen.cli import main
from streamgen.images import (
    DEFAULT_REFERENCE,
    default_reference,
    encode_png,
    read_image,
)
from streamgen.render.writer import VideoWriter, load_latents

from .speech import espeak, write_wav

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "embedded-avatar"  # 32×32 frames at 16 fps, 1,000 samples (16 kHz) per frame
FPS = 16
FACE = (230, 120, 40)  # an orange disc: the reference identity
PHRASES = ("Hello there, this is the avatar speaking.", "And after a pause, a second phrase.")


# --- inputs ----------------------------------------------------------------------------------------
def speech_wav(folder: Path) -> Path:
    """Speech with silence around and between the phrases: the mouth must close in the gaps."""
    parts, rate = [], 22050
    for text in PHRASES:
        data, rate = espeak(text, folder)
        parts += [np.zeros(int(0.6 * rate), np.int16), data]
    return write_wav(folder / "speech.wav", np.concatenate([*parts, np.zeros(int(0.45 * rate), np.int16)]), rate)


def disc_png(path: Path, colour: tuple[int, int, int] = FACE) -> Path:
    """One coloured disc on a black, non-square picture (the reference path rescales it)."""
    yy, xx = np.mgrid[:150, :120]
    img = np.zeros((150, 120, 3), np.uint8)
    img[(yy - 75) ** 2 + (xx - 60) ** 2 < 48 ** 2] = colour
    path.write_bytes(encode_png(img))
    return path


# --- the decoded MP4 -------------------------------------------------------------------------------
@dataclass
class Decoded:
    """What a player gets from an MP4: its streams, their container durations, frames and samples."""

    codecs: tuple[str, str]
    streams: tuple[int, int]  # video, audio
    durations: tuple[float, float]  # s, from the container (what players show)
    frames: np.ndarray  # uint8 [N, H, W, 3]
    audio: np.ndarray  # float32 [M] (the last AAC packet's padding included)
    rate: int
    audio_start: float  # s, the first decoded sample's presentation time


def decode(path: Path) -> Decoded:
    """Demux and decode every stream with PyAV (FFmpeg: the edit lists applied, as players do)."""
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        durations = (float(v.duration * v.time_base), float(a.duration * a.time_base))
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(v)])
        c.seek(0)
        chunks = list(c.decode(a))
        return Decoded((v.codec_context.name, a.codec_context.name), (len(c.streams.video), len(c.streams.audio)),
                       durations, frames, np.concatenate([f.to_ndarray().reshape(-1) for f in chunks]),
                       a.codec_context.sample_rate, float(chunks[0].pts * chunks[0].time_base))


def frame_rms(samples: np.ndarray, frames: int) -> np.ndarray:
    """Per video frame, the RMS of its 1,000 samples (the loudness envelope the mouth follows)."""
    x = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
    x[: min(len(x), len(samples))] = samples[: len(x)]
    return np.sqrt((x.reshape(frames, -1).astype(np.float64) ** 2).mean(axis=1))


def to_model_size(frames: np.ndarray, side: int = 32) -> np.ndarray:
    """The 8× nearest upscale undone: each 8×8 block's mean (H.264 leaves it slightly noisy)."""
    n, h = frames.shape[:2]
    k = h // side
    return frames.reshape(n, side, k, side, k, 3).mean(axis=(2, 4)).round().astype(np.uint8)


def render(*argv: str) -> int:
    """`streamgen render --model embedded-avatar --quiet ARGV` through the real command."""
    return main(["render", "--model", MODEL, "--quiet", *map(str, argv)])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, one_thread):
    """One render of the speech with the orange disc, decoded: (wav, png, samples 16 kHz, Decoded)."""
    folder = tmp_path_factory.mktemp("avatar")
    wav, png = speech_wav(folder), disc_png(folder / "face.png")
    out = folder / "talk.mp4"
    assert render("--audio", wav, "--reference", png, "-o", out) == 0
    return wav, png, load_audio(wav).numpy(), decode(out)


# --- the MP4 ---------------------------------------------------------------------------------------
def test_mp4_is_h264_and_aac_as_long_as_the_audio(rendered):
    _, _, samples, d = rendered
    frames = math.ceil(len(samples) / SAMPLES_PER_FRAME)
    assert d.streams == (1, 1) and d.codecs == ("h264", "aac")
    assert len(d.frames) == frames and d.frames.shape[1:] == (256, 256, 3)  # 32×32 at the page's 8×
    assert abs(d.durations[0] - frames / FPS) < 1e-3
    assert abs(d.durations[0] - d.durations[1]) <= 1 / FPS
    assert d.rate == 16000 and d.audio_start == 0.0  # the AAC priming is undone: sample 0 plays with frame 0
    assert frames * SAMPLES_PER_FRAME <= len(d.audio) < frames * SAMPLES_PER_FRAME + 1024  # + the last packet's padding


def test_audio_track_is_the_driving_audio_in_step_with_the_frames(rendered):
    _, _, samples, d = rendered
    frames = len(d.frames)
    want, got = frame_rms(samples, frames), frame_rms(d.audio, frames)
    assert np.corrcoef(want, got)[0, 1] > 0.9
    shifts = {s: np.corrcoef(want[4:-4], np.roll(got, -s)[4:-4])[0, 1] for s in range(-3, 4)}
    assert max(shifts, key=shifts.get) == 0  # not a frame early or late
    assert got[want < 1e-4].max() < 0.01  # the silences stay silent


def test_default_reference_is_a_white_round_face_and_prompts_are_ignored(tmp_path, capsys):
    identity = identity_from_image(default_reference())
    assert identity.shape == "round" and identity.colour == (1.0, 1.0, 1.0)
    wav = write_wav(tmp_path / "beep.wav", (8000 * np.sin(np.arange(7000) / 5)).astype(np.int16), 16000)  # 7 frames
    out, lat = tmp_path / "o.mp4", tmp_path / "o.safetensors"
    assert render("--audio", wav, "--prompt", "a red fox", "--seconds", "9", "-o", out, "--latents-out", lat) == 0
    err = capsys.readouterr().err
    assert "prompt / timeline is ignored" in err and "--seconds is ignored: the audio sets the length (7 frames" in err
    d = decode(out)
    assert len(d.frames) == 7 and d.durations[0] == pytest.approx(7 / FPS)
    latents, meta = load_latents(lat)
    assert latents.shape[1] == 7 and meta["frames"] == "7" and meta["seconds"] == repr(7 / FPS)
    assert meta["reference"] == DEFAULT_REFERENCE and meta["audio"] == str(wav) and meta["audio_samples"] == "7000"


def test_writer_keeps_audio_and_frames_in_step(tmp_path):
    """A click on every 4th frame: after AAC, each click is still under its own frame."""
    rate, fps, n = 16000, 16, 24
    audio = np.zeros(n * 1000, np.float32)
    for f in range(0, n, 4):
        audio[f * 1000 + 200: f * 1000 + 800] = 0.5 * np.sin(np.arange(600) * 0.3)
    with VideoWriter(tmp_path / "w.mp4", fps, audio_rate=rate) as w:
        for f in range(0, n, 3):
            w.write(np.zeros((3, 32, 32, 3), np.uint8), audio[f * 1000:(f + 3) * 1000])
        with pytest.raises(ValueError, match="3 frames at 16 fps take 3000 audio samples at 16000 Hz, got 2999"):
            w.write(np.zeros((3, 32, 32, 3), np.uint8), audio[:2999])
        with pytest.raises(ValueError, match="got none"):
            w.write(np.zeros((1, 32, 32, 3), np.uint8))
        w.close()
    loud = frame_rms(decode(tmp_path / "w.mp4").audio, n) > 0.05
    assert loud.tolist() == [f % 4 == 0 for f in range(n)]
    with pytest.raises(ValueError, match="no audio track"):
        VideoWriter(tmp_path / "x.mp4", fps).write(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1000))
    with pytest.raises(ValueError, match="not a whole number of samples per frame"):
        VideoWriter(tmp_path / "x.mp4", 24, audio_rate=rate)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.mp4"]


# --- what the avatar shows (needs the trained weights) ----------------------------------------------
def test_checker_reads_the_world_through_the_mp4(rendered, tmp_path):
    """The measuring path of the next test is exact: the world's own clip of the speech, written with its
    audio, decoded and scaled back, scores perfectly (so only the model can fail it)."""
    _, png, samples, _ = rendered
    identity = identity_from_image(read_image(png))
    frames = math.ceil(len(samples) / SAMPLES_PER_FRAME)
    clip = make_clip(identity, samples, blink_schedule(0, frames)).frames  # float [N, 3, 32, 32]
    audio = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
    audio[: len(samples)] = samples
    with VideoWriter(tmp_path / "world.mp4", FPS, audio_rate=16000) as w:
        w.write((clip.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8), audio)
        w.close()
    scores = score_clip(to_model_size(decode(tmp_path / "world.mp4").frames), samples, identity, skip=3)
    assert scores["lag_frames"] == 0 and scores["lipsync_corr"] > 0.99 and scores["colour_match"] == 1.0, scores


def test_trained_avatar_lip_syncs_the_rendered_speech(rendered):
    """EXPECTED TO FAIL with the untrained placeholder weights in streamgen/bundles/weights/; passes with
    the trained ones: the checker reads the decoded MP4's frames against the speech that drove them."""
    _, png, samples, d = rendered
    identity = identity_from_image(read_image(png))
    scores = score_clip(to_model_size(d.frames), samples, identity, skip=3)
    assert abs(scores["lag_frames"]) <= 1, scores
    assert scores["colour_match"] >= 0.9, scores
    assert scores["mouth_speech"] > scores["mouth_silence"] + 0.5, scores


# --- refusals: exit 2, nothing written ---------------------------------------------------------------
@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    """A short WAV, the disc, a WAV that is not one, a PNG that is not one, a black picture."""
    (tmp_path / "bad.wav").write_text("not audio")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {"wav": write_wav(tmp_path / "a.wav", np.zeros(3000, np.int16), 16000), "png": disc_png(tmp_path / "face.png"),
            "bad_wav": tmp_path / "bad.wav", "bad_png": tmp_path / "bad.png",
            "black": disc_png(tmp_path / "black.png", (0, 0, 0)), "missing": tmp_path / "missing.wav"}


REFUSALS = [  # (argv with {name} for an input, a phrase of the message)
    (["--model", "embedded", "--prompt", "a red circle", "--audio", "{wav}"],
     "--audio drives an audio-driven model (embedded-avatar); embedded is a text model"),
    (["--model", "tiny-random", "--prompt", "a", "--audio", "{wav}", "--reference", "{png}"],
     "--audio and --reference drive an audio-driven model (embedded-avatar); tiny-random is a text model"),
    (["--model", "embedded", "--prompt", "a", "--reference", "{png}"], "--reference is an audio-driven model's face"),
    (["--model", MODEL], "embedded-avatar is audio-driven: give --audio SPEECH.wav"),
    (["--model", MODEL, "--reference", "{png}"], "--reference is an audio-driven model's face and goes with --audio"),
    (["--model", MODEL, "--audio", "{missing}"], "--audio: audio file"),
    (["--model", MODEL, "--audio", "{bad_wav}"], "not an integer-PCM WAV file"),
    (["--model", MODEL, "--audio", "{wav}", "--reference", "{bad_png}"], "--reference: the picture bad.png could not be decoded"),
    (["--model", MODEL, "--audio", "{wav}", "--reference", "{missing}"], "--reference: picture file"),
    (["--model", MODEL, "--audio", "{wav}", "--reference", "{black}"], "the reference image is black"),
    (["--model", MODEL, "--audio", "{wav}", "--fps", "24"], "--fps 24 would play the video at another speed than its audio"),
    (["--model", MODEL, "--audio", "{wav}", "--schedule", "timestep-slot"], "schedule 'exact'"),
    (["--model", MODEL, "--audio", "{wav}", "--backend", "ray"], "renders on the local backend only, not 'ray'"),
    (["--model", "live-avatar", "--model-dir", "{missing}", "--audio", "{wav}"],
     "live-avatar is an audio-driven (s2v) family: `streamgen models check/show` know it, but it cannot render yet"),
    (["--model", "live-avatar", "--model-dir", "{missing}", "--prompt", "a"], "cannot be loaded to stream yet"),
]


@pytest.mark.parametrize("argv,message", REFUSALS, ids=[f"{i}-{m[:30]}" for i, (_, m) in enumerate(REFUSALS)])
def test_refusals_exit_2_and_write_nothing(tmp_path, inputs, capsys, argv, message):
    before = sorted(tmp_path.iterdir())
    args = [a.format(**inputs) for a in argv]
    rc = main(["render", *args, "--quiet", "-o", str(tmp_path / "o.mp4"), "--latents-out", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("streamgen render: error: ") and message in err, err
    assert sorted(tmp_path.iterdir()) == before
