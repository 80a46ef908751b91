"""The Python client driving an avatar model: `streamgen client URL --audio speech.wav --reference face.png -o
out.mp4` against a real `embedded-avatar` server sends the speech as the session's audio track (paced in real
time) and the picture as the offer's `reference`, and records what comes back, video and audio, into one MP4.

Speech is espeak-ng's, with silences around and between the phrases. Structural checks (the server saw our
picture and our audio; the MP4 has one H.264 and one AAC stream; the recorded audio is the speech, by the
loudness envelope) hold for any weights; `test_trained_*` checks what the face does and needs the trained
weights (streamgen/bundles/weights/embedded_avatar.safetensors): with the untrained placeholder it fails.
No wall-clock assertions: counts, order and correlations only.
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from streamgen_client.cli import main as client_main  # on the path through test_serve

from streamgen.audio import load_audio, resample
from streamgen.avatar_world import SAMPLES_PER_FRAME, read_frames
from streamgen.images import encode_png

from .speech import espeak, write_wav
from .test_serve import ROOT, run, serving

MODEL = "embedded-avatar"
FPS = 16
FACE = (230, 120, 40)  # an orange disc on black: a round orange face
PHRASES = ("Hello there, this is the avatar speaking.", "And after a pause, a second phrase.")
RECEIVED_RATE = 48000  # what WebRTC's Opus decodes to, and what the client records
LOUD_RMS = 0.01  # a frame of speech (espeak-ng's voiced frames are about 0.1)


# --- inputs ----------------------------------------------------------------------------------------
def speech_wav(path: Path, phrases: tuple[str, ...] = PHRASES, gap_s: float = 1.0) -> Path:
    """The phrases with `gap_s` of silence before each and after the last: the mouth must close in the gaps."""
    parts, rate = [], 22050
    for text in phrases:
        data, rate = espeak(text, path.parent)
        parts += [np.zeros(int(gap_s * rate), np.int16), data]
    return write_wav(path, np.concatenate([*parts, np.zeros(int(gap_s * rate), np.int16)]), rate)


def disc_png(path: Path, colour: tuple[int, int, int] = FACE) -> Path:
    """One coloured disc on a black, non-square (120×150) picture."""
    yy, xx = np.mgrid[:150, :120]
    image = np.zeros((150, 120, 3), np.uint8)
    image[(yy - 75) ** 2 + (xx - 60) ** 2 < 48 ** 2] = colour
    path.write_bytes(encode_png(image))
    return path


# --- envelopes -------------------------------------------------------------------------------------
def frame_rms(samples: np.ndarray, per_frame: int) -> np.ndarray:
    """The RMS of each video frame's share of the samples (the loudness the mouth follows)."""
    n = len(samples) // per_frame
    return np.sqrt((samples[: n * per_frame].reshape(n, per_frame).astype(np.float64) ** 2).mean(axis=1))


def locate(sent: np.ndarray, window: np.ndarray) -> tuple[int, float]:
    """Where in `sent` the samples of `window` match best (normalised cross-correlation), and how well (r)."""
    corr = np.correlate(sent, window, mode="valid")
    energy = np.sqrt(np.maximum(np.convolve(sent ** 2, np.ones(len(window)), mode="valid"), 0)) * np.linalg.norm(window)
    r = corr / np.maximum(energy, 1e-9)
    best = int(np.argmax(r))
    return best, float(r[best])


# --- the recording ---------------------------------------------------------------------------------
@dataclass
class Recording:
    codecs: tuple[str, ...]
    streams: tuple[int, int]  # video, audio
    frames: np.ndarray  # float32 [N, 32, 32, 3]: each decoded frame block-averaged back to model size
    times: np.ndarray  # s, each frame's presentation time
    audio: np.ndarray  # float32 mono at the audio stream's rate
    rate: int


def read_recording(path: Path) -> Recording:
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        codecs, streams = (v.codec_context.name, a.codec_context.name), (len(c.streams.video), len(c.streams.audio))
        decoded = list(c.decode(v))
        c.seek(0)
        audio = np.concatenate([f.to_ndarray().reshape(len(f.layout.channels), -1).mean(axis=0) for f in c.decode(a)])
        rate = a.codec_context.sample_rate
    images = np.stack([f.to_ndarray(format="rgb24") for f in decoded]).astype(np.float32)
    n, h, w, _ = images.shape
    small = images.reshape(n, 32, h // 32, 32, w // 32, 3).mean(axis=(2, 4))
    return Recording(codecs, streams, small, np.array([float(f.pts * f.time_base) for f in decoded]), audio, rate)


@dataclass
class ClientRun:
    output: str  # the command's stdout and stderr
    returncode: int
    views: list[dict]  # GET /sessions/{id} of the client's session, polled while it ran
    speech: np.ndarray  # the WAV as the model hears it: 16 kHz mono
    recording: Recording


async def run_client(server, *argv: str, timeout: float = 90) -> tuple[str, int, list[dict]]:
    """`streamgen client URL ARGV…` as a subprocess; the server's view of its session is polled meanwhile."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "streamgen.cli", "client", server.url, *argv,
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    views: list[dict] = []

    async def poll() -> None:
        while True:
            views.extend(s.describe() for s in list(server.manager.sessions.values()))
            await asyncio.sleep(0.25)

    poller = asyncio.ensure_future(poll())
    try:
        out = (await asyncio.wait_for(proc.communicate(), timeout))[0].decode()
    finally:
        poller.cancel()
    return out, proc.returncode, views


@pytest.fixture(scope="module")
def talked(tmp_path_factory) -> ClientRun:
    """One `streamgen client --audio --reference -o` run against an embedded-avatar server."""
    folder = tmp_path_factory.mktemp("avatar-client")
    wav, png, out = speech_wav(folder / "speech.wav"), disc_png(folder / "face.png"), folder / "talk.mp4"

    async def main() -> tuple[str, int, list[dict]]:
        async with serving(model=MODEL, threads=1) as server:
            return await run_client(server, "--audio", str(wav), "--reference", str(png), "-o", str(out))

    output, code, views = run(main(), timeout=150)
    assert code == 0, output
    return ClientRun(output, code, views, load_audio(wav).numpy(), read_recording(out))


# --- structure (any weights) ------------------------------------------------------------------------
def test_the_server_gets_our_picture_and_our_speech(talked: ClientRun) -> None:
    avatars = [v["avatar"] for v in talked.views if v.get("avatar")]
    assert avatars, f"the server never showed an avatar session: {talked.views[-1:]}"
    last = avatars[-1]
    assert last["reference"] == "given: 120×150 px", last  # the disc's file, as it is
    assert any(a["source"] == "microphone" for a in avatars), avatars[-3:]
    spoken = len(talked.speech) / 16000
    assert last["pushed"] >= 0.9 * spoken and last["played"] > 0, (last, spoken)
    assert "of speech sent" in talked.output and "s of audio received" in talked.output, talked.output


def test_the_recording_has_one_video_and_one_audio_stream(talked: ClientRun) -> None:
    rec = talked.recording
    assert rec.streams == (1, 1) and rec.codecs == ("h264", "aac")
    assert rec.rate == RECEIVED_RATE and rec.frames.shape[1:] == (32, 32, 3)
    assert np.all(np.diff(rec.times) > 0)  # frames in order
    assert len(rec.audio) / rec.rate >= 0.9 * len(talked.speech) / 16000  # as much audio as was spoken, at least


def test_the_recorded_audio_is_the_speech_that_was_sent(talked: ClientRun) -> None:
    """What came back is what drove the avatar: the sent speech, in order, with silence let in where the video
    held a frame (the server plays silence on a held frame's tick; a loaded machine holds many) and perhaps a
    frame's audio lost where it dropped one. So each loud frame of the recording is looked up in the sent
    speech by its waveform: most are found, in order, covering both phrases, and the recording's per-frame RMS
    envelope follows the sent speech's at the places found."""
    got = resample(talked.recording.audio, talked.recording.rate, 16000).numpy()
    frames = got[: len(got) // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME].reshape(-1, SAMPLES_PER_FRAME)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > LOUD_RMS)
    found = [(k, *locate(talked.speech, frames[k])) for k in loud]
    matched = [(k, at) for k, at, r in found if r > 0.7]
    at = np.array([a for _, a in matched])
    in_order = np.mean(np.diff(at) >= -SAMPLES_PER_FRAME // 3)
    spoken = np.flatnonzero(frame_rms(talked.speech, SAMPLES_PER_FRAME) > LOUD_RMS)
    covered = np.isin(spoken, np.r_[at // SAMPLES_PER_FRAME, at // SAMPLES_PER_FRAME + 1]).mean()
    sent_rms = [np.sqrt(np.mean(talked.speech[a:a + SAMPLES_PER_FRAME].astype(np.float64) ** 2)) for a in at]
    corr = np.corrcoef(rms[[k for k, _ in matched]], sent_rms)[0, 1]
    print(f"\n{len(matched)} of {len(loud)} loud recorded frames found in the sent speech ({in_order:.0%} in order), "
          f"covering {covered:.0%} of its {len(spoken)} loud frames; envelope correlation {corr:.3f}")
    assert len(loud) >= 0.5 * len(spoken) and len(matched) >= 0.7 * len(loud), (len(loud), len(matched), len(spoken))
    assert in_order >= 0.9 and covered >= 0.7 and corr > 0.9, (in_order, covered, corr)


# --- what the face does (trained weights) ------------------------------------------------------------
def mouth_by_loudness(rec: Recording) -> tuple[float, float]:
    """Mean mouth opening (the avatar world's reading) on recorded frames whose recorded audio (the samples
    that drove them, beside them on the recording's clock) is speech, and on those where it is silence."""
    per_frame = rec.rate // FPS
    opening = np.array([r.opening for r in read_frames(np.clip(rec.frames.round(), 0, 255).astype(np.uint8))])
    starts = np.round(rec.times * rec.rate).astype(int)
    loud = np.array([np.sqrt(np.mean(rec.audio[s:s + per_frame] ** 2)) if s + per_frame <= len(rec.audio) else np.nan
                     for s in starts])
    speech, silence = loud > 10 ** (-38 / 20), loud < 10 ** (-60 / 20)
    assert speech.sum() >= 8 and silence.sum() >= 8, (speech.sum(), silence.sum())
    return float(opening[speech].mean()), float(opening[silence].mean())


def test_trained_avatar_opens_its_mouth_when_the_recording_speaks(talked: ClientRun) -> None:
    """EXPECTED TO FAIL with the untrained placeholder weights; passes with the trained ones."""
    speaking, silent = mouth_by_loudness(talked.recording)
    print(f"\nmouth opening: {speaking:.2f} while speaking, {silent:.2f} in silence")
    assert speaking > silent + 0.5, (speaking, silent)


# --- refusals ---------------------------------------------------------------------------------------
@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "bad.wav").write_text("not audio")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {"wav": write_wav(tmp_path / "a.wav", np.zeros(8000, np.int16), 16000), "png": disc_png(tmp_path / "f.png"),
            "bad_wav": tmp_path / "bad.wav", "bad_png": tmp_path / "bad.png", "missing": tmp_path / "missing"}


FILE_REFUSALS = [  # (argv with {name} for a file, the message); refused before any connection
    (["--audio", "{missing}"], "audio file {missing} does not exist"),
    (["--audio", "{bad_wav}"], "audio file {bad_wav} cannot be read as audio (expected a WAV file)"),
    (["--audio", "{bad_png}"], "audio file {bad_png} cannot be read as audio (expected a WAV file)"),
    (["--audio", "{wav}", "--reference", "{missing}"], "picture file {missing} does not exist"),
    (["--audio", "{wav}", "--reference", "{bad_png}"], "picture file {bad_png} cannot be decoded as a picture"),
    (["--reference", "{wav}"], "picture file {wav} cannot be decoded as a picture (expected PNG or JPEG)"),
]


@pytest.mark.parametrize("argv,message", FILE_REFUSALS, ids=[m[:32] for _, m in FILE_REFUSALS])
def test_unusable_files_are_refused_before_connecting(bad_files, capsys, argv, message) -> None:
    url = "http://127.0.0.1:9"  # the discard port: nothing is there, and nothing is sent
    code = client_main([url, *(a.format(**bad_files) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("streamgen client: error: ") and message.format(**bad_files) in err, err


def test_a_text_model_refuses_audio_and_reference_with_its_own_message(bad_files) -> None:
    async def main() -> list[tuple[str, int]]:
        async with serving(threads=1) as server:  # tiny-random: a text model
            runs = []
            for argv in (["--audio", str(bad_files["wav"])], ["--reference", str(bad_files["png"])]):
                output, code, _ = await run_client(server, *argv, "--seconds", "1", timeout=40)
                runs.append((output, code))
            return runs

    (audio_out, audio_code), (ref_out, ref_code) = run(main(), timeout=90)
    assert audio_code == 1 and "streamgen client: server refused: HTTP 400: " in audio_out, audio_out
    assert "audio" in audio_out.split("HTTP 400: ", 1)[1], audio_out  # the server's reason, as it is
    assert ref_code == 1 and ("streamgen client: server refused: HTTP 400: the model 'tiny-random' is not "
                              "audio-driven and takes no reference picture") in ref_out, ref_out
