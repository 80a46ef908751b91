"""The web page with an avatar model (`embedded-avatar`), in real headless Chromium against a real server: the
avatar mode (a face instead of a prompt), the face picture sent as the offer's `reference`, the microphone as
the session's audio (Chromium's fake capture device playing an espeak-ng WAV of speech and silence), the
avatar's audio returned and played beside the video, and a speech file pushed over the audio WebSocket with
its `playback_finished` and interruption in the event log.

Shown frames are read back through a canvas at each requestVideoFrameCallback, block-averaged to 32×32 in the
page, together with the loudness of the returned audio being played at that moment (a WebAudio analyser on
the <video>'s audio track). Structural checks hold for any weights; `test_trained_*` checks the mouth and
needs the trained weights (streamgen/bundles/weights/embedded_avatar.safetensors): with the untrained
placeholder it fails. No wall-clock assertions: counts, order and levels only.
"""
from __future__ import annotations

import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest

from streamgen.avatar_world import read_frames
from streamgen.serve.config import ServeConfig

from .speech import espeak, write_wav
from .test_avatar_client import disc_png
from .test_browser import Env, Page, pytestmark, until  # noqa: F401  (pytestmark: skipped without Chromium)

SPEECH_DB, SILENCE_DB = -38.0, -60.0  # returned audio louder than this is speech, quieter silence
MIC_PHRASES = ("Hello there, I am talking to the avatar now.", "Then I stop, and talk again.")
LOG_JS = "document.getElementById('log').innerText"


def alternating_wav(path: Path, gap_s: float = 1.5) -> Path:
    """Speech and silence alternating (Chromium loops the fake microphone's file)."""
    parts, rate = [], 22050
    for text in MIC_PHRASES:
        data, rate = espeak(text, path.parent)
        parts += [np.zeros(int(gap_s * rate), np.int16), data]
    return write_wav(path, np.concatenate(parts), rate)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("avatar-files")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "huge.png").write_bytes(b"\0" * (9 * 1024 * 1024))
    data, rate = espeak("This is a speech file for the avatar.", folder)
    return {"mic": alternating_wav(folder / "mic.wav"), "face": disc_png(folder / "face.png"),
            "bad": folder / "bad.png", "huge": folder / "huge.png", "speech": write_wav(folder / "speech.wav", data, rate)}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]):
    flags = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
             f"--use-file-for-fake-audio-capture={files['mic']}")
    env = Env(tmp_path_factory.mktemp("avatar-browser"),
              ServeConfig(port=0, grace_s=5.0, model="embedded-avatar", threads=1), flags)
    yield env
    env.close()


# --- page helpers ---------------------------------------------------------------------------------------------------
async def avatar_page(env: Env) -> Page:
    page = await env.browser.new_page(env.server.url + "/")
    await page.wait_for("streamgen.avatar.mode", 10, "the avatar mode")
    return page


async def set_file(page: Page, selector: str, path: Path) -> None:
    """Choose a file in an <input type=file>, as the user's file dialog would (DevTools DOM.setFileInputFiles)."""
    root = (await page.call("DOM.getDocument"))["root"]["nodeId"]
    node = (await page.call("DOM.querySelector", nodeId=root, selector=selector))["nodeId"]
    await page.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])


async def connect(page: Page, microphone: bool) -> str:
    """Connect with the microphone on or off; returns the session id once frames show."""
    await page.js(f"document.getElementById('microphone').checked = {json.dumps(microphone)}")
    await page.js("document.getElementById('connect').click()")
    await page.wait_for("streamgen.phase === 'live'", 20, "the page to connect")
    await page.wait_for("document.getElementById('stream').videoWidth > 0", 15, "the first decoded frame")
    return await page.js("streamgen.sessionId")


async def end(env: Env, page: Page) -> None:
    await page.js("document.getElementById('disconnect').click()")
    await until(lambda: not env.server.manager.sessions, 5)
    await page.close()


def avatar_view(env: Env, sid: str) -> dict:
    session = env.server.manager.get(sid)
    return session.describe()["avatar"] if session is not None else {}


# Shown frames block-averaged to 32×32 in the page, each with the RMS of the returned audio playing then.
CAPTURE_JS = """(async (count) => {
  const video = document.getElementById('stream');
  const audio = new AudioContext();
  await audio.resume();
  const analyser = audio.createAnalyser();
  analyser.fftSize = 2048;  // ≈ 43 ms at 48 kHz: one video frame's audio (62.5 ms) or less
  audio.createMediaStreamSource(new MediaStream(video.srcObject.getAudioTracks())).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const canvas = new OffscreenCanvas(video.videoWidth, video.videoHeight);
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const frames = [], levels = [];
  await new Promise((resolve) => {
    const grab = () => {
      const w = video.videoWidth, h = video.videoHeight, sy = h / 32, sx = w / 32;
      ctx.drawImage(video, 0, 0);
      const px = ctx.getImageData(0, 0, w, h).data, out = new Float32Array(32 * 32 * 3);
      for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
        const i = 4 * (y * w + x), o = 3 * (Math.floor(y / sy) * 32 + Math.floor(x / sx));
        out[o] += px[i]; out[o + 1] += px[i + 1]; out[o + 2] += px[i + 2];
      }
      frames.push(Array.from(out, (v) => Math.round(v / (sx * sy))));
      analyser.getFloatTimeDomainData(samples);
      levels.push(Math.sqrt(samples.reduce((a, v) => a + v * v, 0) / samples.length));
      if (frames.length >= count) resolve(); else video.requestVideoFrameCallback(grab);
    };
    video.requestVideoFrameCallback(grab);
  });
  await audio.close();
  return {frames, levels};
})"""


async def capture(page: Page, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` shown frames (uint8 [count, 32, 32, 3]) and the returned audio's RMS beside each."""
    got = await page.js(f"{CAPTURE_JS}({count})", timeout=count / 4 + 20)
    frames = np.asarray(got["frames"], np.float32).reshape(count, 32, 32, 3)
    return np.clip(frames, 0, 255).astype(np.uint8), np.asarray(got["levels"])


# --- the avatar mode and the face -------------------------------------------------------------------------------
def test_an_avatar_model_shows_the_face_and_audio_controls_instead_of_the_prompt(env: Env) -> None:
    async def main():
        page = await avatar_page(env)
        try:
            return await page.js("""(() => { const shown = (id) => getComputedStyle(document.getElementById(id)).display !== 'none';
                return {avatar: shown('avatar'), prompt: shown('prompt-form'), preview: document.getElementById('reference-preview').src,
                        face: document.getElementById('face').value, microphone: document.getElementById('microphone').checked,
                        muted: document.getElementById('stream').muted, reference: streamgen.avatar.reference}; })()""")
        finally:
            await page.close()

    view = env.run(main())
    assert view["avatar"] and not view["prompt"], view
    assert view["face"] == "" and view["reference"] is None  # nothing sent: the server's default face
    assert view["preview"].startswith("data:image/png;base64,") and view["microphone"] and not view["muted"]


def test_an_uploaded_face_is_the_sessions_reference_and_bad_pictures_are_refused(env: Env, files: dict[str, Path]) -> None:
    async def main():
        page = await avatar_page(env)
        try:
            for name in ("bad", "huge"):
                await set_file(page, "#reference-file", files[name])
                await page.wait_for(f"document.getElementById('log').innerText.includes('{files[name].name}')", 10,
                                    f"the refusal of {name}")
            refusals = await page.js(LOG_JS)
            await set_file(page, "#reference-file", files["face"])
            await page.wait_for("document.getElementById('log').innerText.includes('face picture face.png ready')", 10,
                                "the face picture")
            chosen = await page.js("({face: document.getElementById('face').value, reference: streamgen.avatar.reference})")
            sid = await connect(page, microphone=False)
            view = avatar_view(env, sid)
            await end(env, page)
            return refusals, chosen, view
        finally:
            await page.close()

    refusals, chosen, view = env.run(main(), 60)
    assert "face picture refused: bad.png could not be decoded as a picture" in refusals, refusals
    assert "face picture refused: huge.png is 9.0 MB, over the 8 MB limit" in refusals, refusals
    assert chosen["face"] == "upload" and chosen["reference"].startswith("data:image/png;base64,")
    assert view["reference"] == "given: 120×150 px", view  # the picture as uploaded (under 256 px: not scaled)


def test_a_chosen_face_preset_is_sent_and_the_default_sends_none(env: Env) -> None:
    async def main():
        seen = []
        for preset in ("square:#3c78ff", ""):
            page = await avatar_page(env)
            try:
                await page.js(f"(s => {{ s.value = {json.dumps(preset)}; s.dispatchEvent(new Event('change')); }})"
                              "(document.getElementById('face'))")
                sid = await connect(page, microphone=False)
                seen.append(avatar_view(env, sid)["reference"])
                await end(env, page)
            finally:
                await page.close()
        return seen

    square, default = env.run(main(), 60)
    assert square == "given: 128×128 px" and default.startswith("default:"), (square, default)


# --- the microphone ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spoken(env: Env) -> dict:
    """One session driven by the fake microphone: the server's view, the page's audio, ~12 s of shown frames."""
    async def main():
        page = await avatar_page(env)
        try:
            sid = await connect(page, microphone=True)
            assert await until(lambda: avatar_view(env, sid).get("pushed", 0) > 1.0, 20), avatar_view(env, sid)
            page_audio = await page.js("""(() => { const v = document.getElementById('stream');
                return {tracks: v.srcObject.getAudioTracks().map(t => t.readyState), muted: v.muted,
                        sending: streamgen.avatar.sending}; })()""")
            frames, levels = await capture(page, 200)
            stats = await page.js("streamgen.stats")
            view, log_text = avatar_view(env, sid), await page.js(LOG_JS)
            await end(env, page)
            return {"view": view, "audio": page_audio, "frames": frames, "levels": levels, "stats": stats, "log": log_text}
        finally:
            await page.close()

    return env.run(main(), 120)


def test_the_microphone_drives_the_session_and_its_audio_comes_back(spoken: dict) -> None:
    view, audio, levels = spoken["view"], spoken["audio"], spoken["levels"]
    assert view["source"] == "microphone" and view["microphone"]["frames"] > 0 and view["played"] > 0, view
    assert audio == {"tracks": ["live"], "muted": False, "sending": True}, audio
    assert "microphone on: your voice drives the face" in spoken["log"], spoken["log"]
    assert spoken["stats"]["avatar"]["source"] == "microphone"  # the stats message carries the avatar's counters
    db = 20 * np.log10(np.maximum(levels, 1e-6))
    print(f"\nreturned audio while frames were shown: {np.mean(db > SPEECH_DB):.0%} speech, {np.mean(db < SILENCE_DB):.0%} silence")
    assert (db > SPEECH_DB).sum() >= 20 and (db < SILENCE_DB).sum() >= 20, np.round(db)  # speech and pauses both came back


def test_trained_avatar_mouth_moves_with_the_microphone(spoken: dict) -> None:
    """EXPECTED TO FAIL with the untrained placeholder weights; passes with the trained ones: the mouth (the
    avatar world's reading of the shown frames) is open wider while the returned speech plays than in pauses."""
    opening = np.array([r.opening for r in read_frames(spoken["frames"])])
    db = 20 * np.log10(np.maximum(spoken["levels"], 1e-6))
    speaking, silent = opening[db > SPEECH_DB].mean(), opening[db < SILENCE_DB].mean()
    print(f"\nmouth opening: {speaking:.2f} while the avatar's speech plays, {silent:.2f} in its pauses")
    assert speaking > silent + 0.5, (speaking, silent)


# --- a speech file over the audio socket -----------------------------------------------------------------------------
def speech_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as f:
        return f.getnframes() / f.getframerate()


def test_a_speech_file_plays_to_its_end_and_an_interruption_cuts_it(env: Env, files: dict[str, Path]) -> None:
    """Microphone on, then off (the same session, re-offered without it: the socket may take over), then the
    file spoken to its end (playback_finished) and again, interrupted (playback_finished, interrupted)."""
    async def main():
        page = await avatar_page(env)
        try:
            sid = await connect(page, microphone=True)
            assert await until(lambda: avatar_view(env, sid).get("source") == "microphone", 20), avatar_view(env, sid)
            await page.js("(m => { m.checked = false; m.dispatchEvent(new Event('change')); })(document.getElementById('microphone'))")
            await page.wait_for("streamgen.phase === 'live' && !streamgen.avatar.sending", 20, "the re-offer without microphone")
            resumed = await page.js("streamgen.sessionId")
            await set_file(page, "#speech-file", files["speech"])
            await page.wait_for("!document.getElementById('speak').disabled", 5, "the Speak button")
            await page.js("document.getElementById('speak').click()")
            await page.wait_for("streamgen.avatar.playback.length === 1", 30, "the speech to finish")
            played = avatar_view(env, sid)["played_s"]
            await page.js("document.getElementById('speak').click()")
            assert await until(lambda: avatar_view(env, sid)["played_s"] > played + 0.5, 20), avatar_view(env, sid)
            await page.js("document.getElementById('interrupt').click()")
            await page.wait_for("streamgen.avatar.playback.length === 2", 10, "the interruption")
            result = await page.js("streamgen.avatar.playback"), await page.js(LOG_JS), sid, resumed
            await end(env, page)
            return result
        finally:
            await page.close()

    playback, log_text, sid, resumed = env.run(main(), 120)
    seconds = speech_seconds(files["speech"])
    finished, interrupted = playback
    assert resumed == sid and "microphone off: reconnecting session" in log_text, log_text
    assert finished["type"] == "playback_finished" and not finished["interrupted"], finished
    assert abs(finished["position"] - seconds) < 0.05, (finished, seconds)
    assert interrupted["interrupted"] and 0 < interrupted["position"] < seconds, interrupted
    assert f"speaking speech.wav ({seconds:.1f} s)" in log_text, log_text
    assert f"✓ speech finished: {finished['position']:.2f} s shown" in log_text, log_text
    assert re.search(r"interrupt sent\n.*\n⏹ speech interrupted after \d+\.\d\d s shown", log_text), log_text
