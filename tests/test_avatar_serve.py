"""Avatar sessions of `streamgen serve` (the `embedded-avatar` model): the reference picture of the offer, the
audio-driven stream, the agent's audio WebSocket (`/sessions/{id}/audio`), the audio track sent back beside the
video on one media clock, and a viewer's microphone as the input.

Real servers on loopback, real aiortc peers and aiohttp WebSocket clients; speech from espeak-ng. Structural
checks (messages, acks, errors, counters, what the received audio carries) hold for any weights. Tests named
`test_trained_*` check what the avatar's mouth does, which needs the trained weights
(streamgen/bundles/weights/embedded_avatar.safetensors): with the untrained placeholder they may fail.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import subprocess
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from streamgen.audio import SAMPLE_RATE, load_audio, read_wav
from streamgen.engine.driven import AudioOverflowError
from streamgen.errors import InputError
from streamgen.images import encode_png
from streamgen.serve.audio_buffer import TimedAudioBuffer
from streamgen.serve.audio_in import MIC_LEAD_S
from streamgen.serve.pcm import SUPPORTED_RATES, PcmStream
from streamgen.serve.playback import Playback

from .test_serve import run, serving, until

MODEL = "embedded-avatar"


# --- inputs ----------------------------------------------------------------------------------------------------
def data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()


def square_picture(colour: tuple[int, int, int] = (255, 0, 0), size: int = 96) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 6:-size // 6, size // 6:-size // 6] = colour
    return image


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """A WAV of espeak-ng speech (22050 Hz mono, about 2.5 s)."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello there, this is the avatar speaking to you now"], check=True)
    return path


@pytest.fixture(scope="module")
def late_speech(speech: Path) -> Path:
    """The same speech after 1 s of silence: a microphone's audio arrives in real time, so the first chunks find
    less than theirs and play silence in its place (the buffer's lead grows until they do not); the silence
    lets that settle before the speech."""
    path = speech.with_name("late_speech.wav")
    with wave.open(str(speech), "rb") as f:
        params, frames = f.getparams(), f.readframes(f.getnframes())
    with wave.open(str(path), "wb") as f:
        f.setparams(params)
        f.writeframes(b"\0" * (params.sampwidth * params.framerate) + frames)
    return path


# --- peers -------------------------------------------------------------------------------------------------------
class AvatarPeer:
    """A viewer of an avatar session: receives video (block-averaged back to 32×32) and audio (mono float at
    48 kHz) with their RTP timestamps; optionally sends a microphone track on a sendrecv audio section."""

    def __init__(self, microphone=None, audio: str | None = "recvonly") -> None:
        """`audio`: the audio section's direction (None: none); a `microphone` track makes it sendrecv."""
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        if microphone is not None:
            self.pc.addTransceiver(microphone, direction="sendrecv")
        elif audio is not None:
            self.pc.addTransceiver("audio", direction=audio)
        self.pc.createDataChannel("control")
        self.video: list[tuple[int, np.ndarray]] = []  # (pts, frame uint8-valued float32 [32, 32, 3])
        self.audio: list[tuple[int, np.ndarray]] = []  # (pts, samples float32 [n])
        self._tasks: list[asyncio.Task] = []
        self.pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._read(track))))

    async def _read(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    image = frame.to_ndarray(format="rgb24")
                    s = image.shape[0] // 32
                    self.video.append((frame.pts, image.reshape(32, s, 32, s, 3).mean(axis=(1, 3))))
                else:
                    samples = frame.to_ndarray().astype(np.float32).reshape(-1, len(frame.layout.channels))
                    self.audio.append((frame.pts, samples.mean(axis=1) / 32768))

    async def open(self, http: aiohttp.ClientSession, url: str, **body) -> tuple[int, dict]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(f"{url}/offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer", **body}) as r:
            reply = await r.json()
        if r.status == 200:
            await self.pc.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
        return r.status, reply

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


@contextlib.asynccontextmanager
async def avatar_server(**settings) -> AsyncIterator:
    async with serving(model=MODEL, threads=1, **settings) as server:
        yield server


async def frames_seen(peer: AvatarPeer, n: int, seconds: float = 30.0) -> None:
    assert await until(lambda: len(peer.video) >= n, seconds), f"only {len(peer.video)} frames in {seconds:g} s"


# --- step 1: the reference, the driven stream, its counters ---------------------------------------------------------
def test_an_avatar_offer_takes_a_reference_or_the_default_and_idles_without_audio() -> None:
    async def main():
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            given, default = AvatarPeer(), AvatarPeer()
            status, reply = await given.open(http, server.url, reference=data_url(square_picture()))
            assert status == 200, reply
            status_default, reply_default = await default.open(http, server.url)
            assert status_default == 200, reply_default
            await frames_seen(given, 8)
            await frames_seen(default, 8)
            async with http.get(f"{server.url}/sessions/{reply['session_id']}") as r:
                view = await r.json()
            async with http.get(f"{server.url}/sessions/{reply_default['session_id']}") as r:
                view_default = await r.json()
            async with http.get(f"{server.url}/model") as r:
                model = await r.json()
            await given.close()
            await default.close()
        return view, view_default, model

    view, view_default, model = run(main())
    avatar, avatar_default = view["avatar"], view_default["avatar"]
    assert avatar["reference"] == "given: 96×96 px" and avatar_default["reference"].startswith("default: a white disc")
    for a in (avatar, avatar_default):  # no audio came: every chunk was driven by silence, nothing was waited for
        assert a["pushed"] == 0 and a["played"] == 0 and a["filled"] > 0 and a["av_latency_ms"] is None, a
        assert a["capacity_s"] == 30.0 and a["sample_rate"] == SAMPLE_RATE and a["source"] is None
    assert view["frames"]["sent"] > 0
    assert model["avatar"] == {"sample_rate": 16000, "samples_per_frame": 1000,
                               "default_reference": avatar_default["reference"]}


def test_bad_references_and_misfit_offers_get_clear_400s_and_leak_nothing() -> None:
    png = base64.b64encode(encode_png(square_picture())).decode()
    cases = [
        ("hello", "must be a data URL of a PNG or JPEG"),
        ("data:text/plain;base64,aGVsbG8=", "must be a data URL of a PNG or JPEG"),
        ("data:image/png;base64,@@@notbase64@@@", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode(), "could not be decoded"),
        ("data:image/png;base64," + "A" * (4 * 1024 * 1024 * 4 // 3 + 8), "over the 4 MB limit"),
        (data_url(np.zeros((64, 64, 3), np.uint8)), "black"),
        ("data:image/png;base64," + png[: len(png) // 2 // 4 * 4], "could not be decoded"),
    ]

    async def main():
        replies = []
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            for reference, _ in cases:
                peer = AvatarPeer()
                replies.append(await peer.open(http, server.url, reference=reference))
                await peer.close()
            peer = AvatarPeer()
            with_video = await peer.open(http, server.url, video={})
            await peer.close()
            leaked = server.backend.stats()["streams"], len(server.manager.sessions)
            up = (await http.get(f"{server.url}/health")).status
        async with serving(threads=1) as server, aiohttp.ClientSession() as http:  # tiny-random: a text model
            peer = AvatarPeer()
            text_model = await peer.open(http, server.url, reference=data_url(square_picture()))
            await peer.close()
            peer = AvatarPeer(audio="sendrecv")
            text_audio = await peer.open(http, server.url)
            await peer.close()
            text_leaked = server.backend.stats()["streams"]
            peer = AvatarPeer(audio="recvonly")  # receiving audio is harmless: answered inactive
            text_listens = await peer.open(http, server.url)
            await peer.close()
        return replies, with_video, leaked, up, text_model, text_audio, text_leaked, text_listens

    replies, with_video, leaked, up, text_model, text_audio, text_leaked, text_listens = run(main(), timeout=120)
    for (reference, words), (status, reply) in zip(cases, replies):
        assert status == 400 and words in reply["error"], (reference[:40], status, reply)
    assert with_video[0] == 400 and "takes no video input" in with_video[1]["error"], with_video
    assert leaked == (0, 0) and up == 200
    assert text_model[0] == 400 and "takes no reference picture" in text_model[1]["error"], text_model
    assert text_audio[0] == 400 and "takes no audio" in text_audio[1]["error"], text_audio
    assert text_leaked == 0 and text_listens[0] == 200


def test_pushed_audio_is_played_and_its_latency_measured(speech: Path) -> None:
    """Audio put in the session's buffer (here directly; the WebSocket is tested below) is taken by the chunks,
    and the frames it drove report how long after its arrival they were sent."""
    samples = load_audio(speech).numpy()

    async def main():
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            peer = AvatarPeer(audio=None)
            status, reply = await peer.open(http, server.url)
            assert status == 200, reply
            await frames_seen(peer, 4)
            session = server.manager.get(reply["session_id"])
            session.avatar.audio.push(samples)
            assert await until(lambda: session.avatar.played >= len(samples), 30)
            view = session.describe()
            stats = session.stats()
            await peer.close()
        return view, stats

    view, stats = run(main())
    avatar = view["avatar"]
    assert avatar["pushed"] == avatar["played"] == round(len(samples) / SAMPLE_RATE, 3) and avatar["dropped"] == 0
    assert avatar["played_s"] == avatar["pushed"] and avatar["buffered_s"] == 0
    assert avatar["av_latency_ms"] is not None and avatar["av_latency_ms"] > 0
    assert stats.avatar is not None and stats.avatar["pushed"] == avatar["pushed"]


# --- step 2: the audio WebSocket -------------------------------------------------------------------------------------
def wav_pcm(path: Path) -> tuple[bytes, int]:
    """A WAV file's samples as s16le mono bytes, and its rate."""
    data, rate = read_wav(path)
    return (data.mean(dim=0).numpy() * 32768).clip(-32768, 32767).astype("<i2").tobytes(), rate


def pieces(pcm: bytes, rate: int, seconds: float = 0.1) -> list[bytes]:
    step = round(rate * seconds) * 2
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]


class AudioSocket:
    """An agent's audio WebSocket: sends, and collects every message the server sends."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                self.messages.append(json.loads(message.data))

    async def next(self, kind: str, after: int = 0, seconds: float = 30.0) -> dict:
        """The first message of `kind` from index `after` on."""
        found = lambda: [m for m in self.messages[after:] if m["type"] == kind]
        assert await until(found, seconds), f"no {kind!r} message in {seconds:g} s: {self.messages[after:]}"
        return found()[0]

    async def send_speech(self, pcm: bytes, rate: int) -> None:
        for piece in pieces(pcm, rate):
            await self.ws.send_bytes(piece)

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


async def open_audio(http: aiohttp.ClientSession, url: str, sid: str, query: str = "", **kwargs) -> AudioSocket:
    socket = AudioSocket(await http.ws_connect(f"{url}/sessions/{sid}/audio{query}", **kwargs))
    await socket.next("ready")
    return socket


def test_playback_segments_follow_the_shown_position() -> None:
    playback = Playback(16000)
    playback.pushed(0)
    playback.pushed(8000)  # the same utterance
    assert playback.flush(16000, shown=4000) == []
    playback.pushed(16000)
    assert playback.played(15999) == []
    done = playback.played(20000)
    assert [(d.position, d.interrupted) for d in done] == [(1.0, False)]
    empty = playback.flush(16000 + 8000, shown=20000)  # the second utterance: 0.5 s, not shown whole yet
    assert empty == []
    cut = playback.interrupt(24000, shown=22000)
    assert [(d.position, d.interrupted) for d in cut] == [(0.375, True)]
    assert playback.interrupt(24000, shown=22000) == []  # nothing left to interrupt
    assert [(d.position, d.interrupted) for d in playback.flush(24000, shown=24000)] == [(0.0, False)]


def test_pcm_resampling_keeps_its_state_across_messages(speech: Path) -> None:
    pcm, rate = wav_pcm(speech)
    whole, cut = PcmStream(rate, SAMPLE_RATE), PcmStream(rate, SAMPLE_RATE)
    one = np.concatenate([whole.samples(piece) for piece in pieces(pcm, rate, 1.0)] + [whole.drain()])
    many = np.concatenate([cut.samples(piece) for piece in pieces(pcm, rate, 0.013)] + [cut.drain()])
    assert len(one) == len(many) == round(len(pcm) / 2 * SAMPLE_RATE / rate)
    assert np.abs(one - many).max() < 1e-6  # the same filter state, whatever the cut
    reference = load_audio(speech).numpy()  # the project's own band-limited resampler
    assert np.corrcoef(one[: len(reference)], reference[: len(one)])[0, 1] > 0.99
    for bad, words in [(b"", "empty"), (b"\0" * 3, "must be even"), (b"\0" * (2 * rate + 2), "at most 1 s")]:
        with pytest.raises(InputError, match=words):
            whole.samples(bad)
    with pytest.raises(InputError, match="not supported"):
        PcmStream(44000, SAMPLE_RATE)
    native = PcmStream(SAMPLE_RATE, SAMPLE_RATE).samples(np.array([16384, -32768], "<i2").tobytes())
    assert native.tolist() == [0.5, -1.0]


def test_the_timed_buffer_knows_when_each_frames_audio_arrived() -> None:
    buffer = TimedAudioBuffer(16000, 16000, samples_per_frame=1000)
    buffer.push(np.ones(1500, np.float32))
    buffer.push(np.ones(1000, np.float32))
    first, second = buffer._times
    samples, real = buffer.take(3000)
    assert real == 2500 and samples[2500:].tolist() == [0] * 500
    take = buffer.taken()
    assert take.real == 2500 and take.clears == 0
    assert take.frames == [(1000, first), (2000, second), (2500, second)]  # frame 1 ends in the second push
    buffer.push(np.ones(4000, np.float32))
    assert buffer.clear() == 4000 and buffer.clears == 1
    buffer.push(np.ones(500, np.float32))
    buffer.take(3000)
    take = buffer.taken()
    assert take.clears == 1 and [end for end, _ in take.frames] == [7000, 7000, 7000]  # after the 4000 dropped
    assert [heard is None for _, heard in take.frames] == [False, True, True]
    assert buffer.taken() is None and buffer.position == 7000
    with pytest.raises(AudioOverflowError, match="ahead of the video"):
        buffer.push(np.ones(16001, np.float32))


def test_an_agent_pushes_speech_and_hears_when_it_was_shown(speech: Path, tracebacks) -> None:
    """Speech faster than real time in 100 ms messages at 22050 Hz, then `flush`: one playback_finished with the
    whole utterance; bad messages each get an error naming the problem, and the socket and session go on."""
    pcm, rate = wav_pcm(speech)
    expected = round(len(pcm) / 2 * SAMPLE_RATE / rate)

    async def main():
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            peer = AvatarPeer()
            status, reply = await peer.open(http, server.url)
            assert status == 200, reply
            sid = reply["session_id"]
            agent = await open_audio(http, server.url, sid, f"?sample_rate={rate}")
            await agent.send_speech(pcm, rate)
            await agent.ws.send_str('{"type": "flush"}')
            finished = await agent.next("playback_finished")
            view = server.manager.get(sid).describe()
            bad = [(b"\0" * 3, "audio", "must be even"), (b"\0" * (2 * rate + 2), "audio", "at most 1 s"),
                   ("not json", None, "not valid JSON"), ('{"type": "dance"}', None, "unknown message type 'dance'"),
                   ('{"type": "flush", "now": 1}', "flush", "unknown field 'now'"),
                   ('{"type": "format", "sample_rate": 44000}', "format", "not supported"),
                   ('{"type": "format", "sample_rate": "fast"}', "format", "sample_rate")]
            errors = []
            for message, _, _ in bad:
                count = len(agent.messages)
                await (agent.ws.send_bytes(message) if isinstance(message, bytes) else agent.ws.send_str(message))
                errors.append(await agent.next("error", after=count))
            count = len(agent.messages)
            await agent.ws.send_str('{"type": "format", "sample_rate": 16000}')
            await agent.ws.send_bytes(np.zeros(1600, "<i2").tobytes())  # 0.1 s of silence, now at 16 kHz
            await agent.ws.send_str('{"type": "flush"}')
            second = await agent.next("playback_finished", after=count)
            after = server.manager.get(sid).describe()
            await agent.close()
            await peer.close()
        return finished, view, errors, bad, second, after, agent.messages

    finished, view, errors, bad, second, after, messages = run(main(), timeout=90)
    ready = messages[0]
    assert ready == {"type": "ready", "session_id": ready["session_id"], "sample_rate": 22050, "model_sample_rate": 16000,
                     "supported_rates": list(SUPPORTED_RATES), "capacity_s": 30.0, "max_message_s": 1.0}
    assert finished == {"type": "playback_finished", "position": round(expected / SAMPLE_RATE, 4), "interrupted": False}
    assert view["avatar"]["pushed"] == round(expected / SAMPLE_RATE, 3) and view["avatar"]["played"] >= view["avatar"]["pushed"]
    assert view["avatar"]["av_latency_ms"] > 0 and view["avatar"]["source"] == "websocket"
    for (message, of, words), reply in zip(bad, errors):
        assert words in reply["message"] and reply.get("of") == of, (message[:30], reply)
    assert second == {"type": "playback_finished", "position": 0.1, "interrupted": False}
    assert after["avatar"]["pushed"] == round((expected + 1600) / SAMPLE_RATE, 3)
    assert [m["type"] for m in messages].count("playback_finished") == 2


def test_clear_interrupts_the_utterance_at_once(speech: Path) -> None:
    """`clear` mid-word: exactly one playback_finished, interrupted, at the position shown; the rest of the
    audio is dropped (not played), and a flush after it is an empty utterance."""
    pcm, rate = wav_pcm(speech)
    total = len(pcm) / 2 / rate

    async def main():
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            peer = AvatarPeer()
            status, reply = await peer.open(http, server.url)
            assert status == 200, reply
            session = server.manager.get(reply["session_id"])
            agent = await open_audio(http, server.url, session.id, f"?sample_rate={rate}")
            await agent.send_speech(pcm, rate)
            assert await until(lambda: session.avatar.played > 0.6 * SAMPLE_RATE, 30)
            await agent.ws.send_str('{"type": "clear"}')
            cut = await agent.next("playback_finished")
            view = session.describe()
            count = len(agent.messages)
            await agent.ws.send_str('{"type": "flush"}')
            empty = await agent.next("playback_finished", after=count)
            await frames_seen(peer, len(peer.video) + 8)
            later = session.describe()
            await agent.close()
            await peer.close()
        return cut, view, empty, later, agent.messages

    cut, view, empty, later, messages = run(main(), timeout=90)
    assert cut["interrupted"] is True and 0.5 < cut["position"] < total - 0.5, cut
    assert view["avatar"]["dropped"] > 0.5 and view["avatar"]["buffered_s"] == 0
    assert abs(view["avatar"]["played"] + view["avatar"]["dropped"] - view["avatar"]["pushed"]) < 0.002  # ms rounding
    assert empty == {"type": "playback_finished", "position": 0.0, "interrupted": False}
    assert [m["type"] for m in messages].count("playback_finished") == 2  # one per utterance, no more
    assert later["avatar"]["played"] == view["avatar"]["played"]  # nothing of the dropped audio played later


def test_trained_clear_closes_the_mouth_after_the_next_chunk(speech: Path) -> None:
    """NEEDS THE TRAINED WEIGHTS. The avatar speaks (its mouth opens) while the speech plays; after a clear, the
    frames the viewer receives past the next chunk boundary (3 frames, plus a held frame or two while that chunk
    computes) show the mouth closed."""
    from streamgen.avatar_world import read_frames

    pcm, rate = wav_pcm(speech)

    async def main():
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            peer = AvatarPeer(audio=None)
            status, reply = await peer.open(http, server.url)
            assert status == 200, reply
            session = server.manager.get(reply["session_id"])
            agent = await open_audio(http, server.url, session.id, f"?sample_rate={rate}")
            await agent.send_speech(pcm, rate)
            assert await until(lambda: session.avatar.played > 1.2 * SAMPLE_RATE, 30)
            await agent.ws.send_str('{"type": "clear"}')
            await agent.next("playback_finished")
            cleared = len(peer.video)
            await frames_seen(peer, cleared + 6 + 16)
            await agent.close()
            await peer.close()
        return peer.video, cleared

    video, cleared = run(main(), timeout=90)
    opening = [r.opening for r in read_frames(np.round(np.stack([f for _, f in video])).astype(np.uint8))]
    speaking, after = opening[cleared - 16:cleared], opening[cleared + 6:cleared + 22]
    assert max(speaking) >= 2 and np.mean(after) < 0.5 and max(after) <= 1, (speaking, after)


def test_an_audio_socket_hears_its_sessions_end(speech: Path) -> None:
    """The session is deleted mid-utterance: the utterance is reported interrupted and the socket closes (1001)."""
    pcm, rate = wav_pcm(speech)

    async def main():
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            peer = AvatarPeer()
            status, reply = await peer.open(http, server.url)
            assert status == 200, reply
            agent = await open_audio(http, server.url, reply["session_id"], f"?sample_rate={rate}")
            await agent.send_speech(pcm, rate)
            async with http.delete(f"{server.url}/sessions/{reply['session_id']}") as r:
                deleted = r.status
            await asyncio.wait_for(agent.reader, 10)
            await peer.close()
        return deleted, agent.messages, agent.ws.close_code

    deleted, messages, code = run(main())
    assert deleted == 200 and code == 1001
    assert [m["type"] for m in messages] == ["ready", "playback_finished"] and messages[1]["interrupted"] is True


def test_audio_socket_refusals_name_the_problem() -> None:
    async def main():
        out = {}
        async with avatar_server(token="secret") as server:
            auth = {"Authorization": "Bearer secret"}
            async with aiohttp.ClientSession(headers=auth) as http:
                peer = AvatarPeer()
                status, reply = await peer.open(http, server.url)
                sid = reply["session_id"]
                base = f"{server.url}/sessions/{sid}/audio"
                for name, url, headers in [("unknown", f"{server.url}/sessions/nope/audio", {}),
                                           ("rate", base + "?sample_rate=44000", {}),
                                           ("rate_word", base + "?sample_rate=fast", {}),
                                           ("param", base + "?channels=2", {}),
                                           ("plain", base, {}),
                                           ("cross_site", base, {"Origin": "http://evil.example"})]:
                    async with http.get(url, headers=headers) as r:
                        out[name] = (r.status, (await r.json())["error"])
                first = await open_audio(http, server.url, sid, headers={"Origin": server.url})  # the server's own page
                try:
                    await http.ws_connect(base)
                except aiohttp.WSServerHandshakeError as exc:
                    out["second"] = exc.status
                await first.close()
                huge = await open_audio(http, server.url, sid)  # the first one is gone: the source is free again
                await huge.ws.send_bytes(b"\0" * (2 * 1024 * 1024))  # past the 1 MiB frame limit: aiohttp closes
                await asyncio.wait_for(huge.reader, 10)
                out["huge"] = huge.ws.close_code
                again = await open_audio(http, server.url, sid)  # and that socket let go of the session too
                await again.ws.send_bytes(b"\0" * 320)
                await again.ws.send_str('{"type": "flush"}')
                out["again"] = await again.next("playback_finished")
                await again.close()
                await peer.close()
            async with aiohttp.ClientSession() as http:  # no Authorization header, as a browser's WebSocket
                async with http.get(f"{server.url}/sessions/{sid}/audio") as r:
                    out["no_token"] = (r.status, (await r.json())["error"])
                ws = await http.ws_connect(f"{server.url}/sessions/{sid}/audio", protocols=("streamgen.audio", "bearer.secret"))
                out["subprotocol"] = (ws.protocol, json.loads((await ws.receive(timeout=30)).data)["type"])
                await ws.close()
                try:
                    await http.ws_connect(f"{server.url}/sessions/{sid}/audio", protocols=("streamgen.audio", "bearer.wrong"))
                except aiohttp.WSServerHandshakeError as exc:
                    out["wrong_subprotocol"] = exc.status
        async with serving(threads=1) as server, aiohttp.ClientSession() as http:
            peer = AvatarPeer()
            status, reply = await peer.open(http, server.url)
            assert status == 200, reply
            async with http.get(f"{server.url}/sessions/{reply['session_id']}/audio") as r:
                out["text_model"] = (r.status, (await r.json())["error"])
            await peer.close()
        return out

    out = run(main(), timeout=90)
    assert out["unknown"][0] == 404 and "nope" in out["unknown"][1]
    assert out["rate"][0] == 400 and "44000 Hz is not supported" in out["rate"][1]
    assert out["rate_word"][0] == 400 and "whole number" in out["rate_word"][1]
    assert out["param"][0] == 400 and "'channels'" in out["param"][1]
    assert out["plain"][0] == 426 and "WebSocket" in out["plain"][1]
    assert out["cross_site"][0] == 403 and "evil.example" in out["cross_site"][1]
    assert out["second"] == 409
    assert out["huge"] == 1009 and out["again"] == {"type": "playback_finished", "position": 0.01, "interrupted": False}
    assert out["no_token"][0] == 401
    assert out["subprotocol"] == ("streamgen.audio", "ready") and out["wrong_subprotocol"] == 401
    assert out["text_model"][0] == 409 and "not audio-driven" in out["text_model"][1]


# --- step 3: the audio track beside the video ------------------------------------------------------------------
def received_audio(peer: AvatarPeer) -> np.ndarray:
    """The received audio on its own clock: each frame placed at its RTP time since the first (48 kHz)."""
    first = peer.audio[0][0]
    end = max(pts - first + len(s) for pts, s in peer.audio)
    out = np.zeros(end, np.float32)
    for pts, samples in peer.audio:
        out[pts - first:pts - first + len(samples)] = samples
    return out


def envelope(samples: np.ndarray, rate: int, bin_s: float = 0.01) -> np.ndarray:
    n = round(rate * bin_s)
    x = samples[: len(samples) // n * n].astype(np.float64).reshape(-1, n)
    return np.sqrt((x * x).mean(axis=1))


def best_match(received: np.ndarray, sent: np.ndarray) -> tuple[int, float]:
    """(lag in bins, correlation) where the envelope `sent` best matches a stretch of `received`."""
    best = (0, -1.0)
    for lag in range(len(received) - len(sent) + 1):
        part = received[lag:lag + len(sent)]
        r = float(np.corrcoef(part, sent)[0, 1]) if part.std() > 0 else 0.0
        if r > best[1]:
            best = (lag, r)
    return best


def heard_in_order(received: np.ndarray, sent: np.ndarray, rate: int, window_s: float = 0.5) -> list[tuple[int, float]]:
    """Where each 0.5 s window of `sent` (16 kHz) is in `received` (at `rate`), by envelope: (lag, correlation).
    Windows, not the whole: a chunk computed late holds the video and inserts silence into its audio (they stay
    in sync), so the whole utterance does not sit at one lag. The first window is looked for anywhere, each
    later one from half a window before where it would be after the first to 1.5 s after (the silence that
    holds can have inserted before it)."""
    env_received, env_sent = envelope(received, rate), envelope(sent, SAMPLE_RATE)
    step = round(window_s / 0.01)
    first, r = best_match(env_received, env_sent[:step])
    found = [(first, r)]
    for w in range(step, len(env_sent) - step + 1, step):
        lo = max(0, first + w - step // 2)
        lag, r = best_match(env_received[lo:first + w + 150 + step], env_sent[w:w + step])
        found.append((lo + lag, r))
    return found


def assert_heard(received: np.ndarray, sent: np.ndarray, rate: int, r_min: float) -> None:
    """The speech was received, in order: its windows each match a later stretch of what was received."""
    windows = heard_in_order(received, sent, rate)
    assert len(windows) >= 4 and np.median([r for _, r in windows]) > r_min, windows


async def hear_speech(speech: Path, after_s: float = 0.5) -> tuple[AvatarPeer, dict, list[dict]]:
    """A viewer of a default-reference session while an agent pushes `speech` and flushes; returns once the
    utterance was shown and `after_s` more of audio arrived."""
    pcm, rate = wav_pcm(speech)
    async with avatar_server() as server, aiohttp.ClientSession() as http:
        peer = AvatarPeer()
        status, reply = await peer.open(http, server.url)
        assert status == 200, reply
        await frames_seen(peer, 4)
        agent = await open_audio(http, server.url, reply["session_id"], f"?sample_rate={rate}")
        await agent.send_speech(pcm, rate)
        await agent.ws.send_str('{"type": "flush"}')
        await agent.next("playback_finished")
        heard = len(peer.audio)
        assert await until(lambda: len(peer.audio) >= heard + after_s / 0.02, 30)
        view = server.manager.get(reply["session_id"]).describe()
        await agent.close()
        await peer.close()
    return peer, view, agent.messages


def test_the_viewer_receives_the_pushed_speech_beside_the_video(speech: Path) -> None:
    peer, view, _ = run(hear_speech(speech), timeout=90)
    pts = [p for p, _ in peer.audio]
    assert len(peer.video) > 0 and len(peer.audio) > 0
    assert all(b > a for a, b in itertools.pairwise(pts)) and all((p - pts[0]) % 960 == 0 for p in pts)  # 20 ms frames
    assert_heard(received_audio(peer), load_audio(speech).numpy(), 48000, 0.9)  # the speech, through Opus
    assert view["avatar"]["played"] == view["avatar"]["pushed"]


def mouth_and_audio(peer: AvatarPeer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames received, mouth opening read off each, the opening the received audio at the same received time
    calls for): video frame n sits at pts n/16 s since the first, its audio at the same media time."""
    from streamgen.avatar_world import mouth_openings, read_frames

    audio = received_audio(peer)
    first = peer.video[0][0]
    ticks = [round((pts - first) * 16 / 90000) for pts, _ in peer.video]
    frames = np.round(np.stack([f for _, f in peer.video])).astype(np.uint8)
    opening = np.array([r.opening for r in read_frames(frames)])
    at_16k = np.stack([audio[t * 3000:(t + 1) * 3000][::3] if (t + 1) * 3000 <= len(audio) else np.zeros(1000, np.float32)
                       for t in ticks])
    return frames, opening, mouth_openings(at_16k.reshape(-1), len(ticks)).astype(np.float64)


def test_trained_the_mouth_moves_with_the_audio_it_is_sent_with(speech: Path) -> None:
    """NEEDS THE TRAINED WEIGHTS. The mouth openings read off the received frames follow the received audio's
    loudness at lag 0 (±1 frame)."""
    from streamgen.avatar_world import lag_and_correlation

    peer, _, _ = run(hear_speech(speech), timeout=90)
    _, opening, target = mouth_and_audio(peer)
    lag, r, _ = lag_and_correlation(opening, target)
    assert abs(lag) <= 1 and r > 0.5, (lag, r)


# --- step 4: a microphone in ---------------------------------------------------------------------------------------
def test_a_microphone_drives_the_avatar_and_comes_back_as_its_audio(speech: Path, late_speech: Path) -> None:
    """An aiortc peer sends a WAV as its microphone (sendrecv audio) with a disc reference: the server pushes it
    into the session's audio, and the viewer gets video and that audio back."""
    from aiortc.contrib.media import MediaPlayer

    disc = np.zeros((80, 80, 3), np.uint8)
    yy, xx = np.mgrid[:80, :80]
    disc[(yy - 40) ** 2 + (xx - 40) ** 2 <= 30 ** 2] = (40, 200, 90)
    length = len(load_audio(late_speech)) / SAMPLE_RATE

    async def main():
        async with avatar_server() as server, aiohttp.ClientSession() as http:
            player = MediaPlayer(str(late_speech))
            peer = AvatarPeer(microphone=player.audio)
            status, reply = await peer.open(http, server.url, reference=data_url(disc))
            assert status == 200, reply
            session = server.manager.get(reply["session_id"])
            assert await until(lambda: session.avatar.source == "microphone", 30), session.describe()["avatar"]
            try:
                await http.ws_connect(f"{server.url}/sessions/{session.id}/audio")
            except aiohttp.WSServerHandshakeError as exc:
                refused = exc.status
            view = session.describe()  # while the microphone plays
            mic = session.avatar.microphone
            assert await until(lambda: mic["frames"] >= length / 0.02 - 5, 30)  # all of it, in 20 ms frames, in real time
            assert await until(lambda: session.avatar.played >= session.avatar.audio.position, 30)  # and all shown
            heard = len(peer.audio)
            assert await until(lambda: len(peer.audio) >= heard + 25, 30)
            after = session.describe()
            await peer.close()
        return peer, view, after, refused

    peer, view, after, refused = run(main(), timeout=90)
    assert refused == 409  # one audio source at a time: the microphone holds it
    assert view["avatar"]["reference"] == "given: 80×80 px" and view["avatar"]["source"] == "microphone"
    microphone = after["avatar"]["microphone"]
    assert microphone["refused"] == microphone["overflow"] == 0
    came_in = after["avatar"]["pushed"] - MIC_LEAD_S + 0.02 * microphone["skipped"]  # less the lead, with quiet skips
    assert abs(came_in - length) < 0.2, (after["avatar"], length)
    assert len(peer.video) > 0
    assert_heard(received_audio(peer), load_audio(speech).numpy(), 48000, 0.8)  # the viewer's speech, Opus both ways
    # the face: the disc's colour, its mouth open in speech and shut in silence, in step with the audio (±2 frames)
    from streamgen.avatar_world import identity_from_image, lag_and_correlation, read_frames

    frames, opening, target = mouth_and_audio(peer)
    colour = np.asarray(identity_from_image(disc).colour)
    assert np.mean([np.abs(np.asarray(r.colour) - colour).max() <= 0.15 for r in read_frames(frames)]) >= 0.9
    assert opening[target > 0].mean() > opening[target == 0].mean() + 1.0, (opening[target > 0].mean(), opening[target == 0].mean())
    assert abs(lag_and_correlation(opening, target)[0]) <= 2
