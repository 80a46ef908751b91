"""`streamgen serve`: real aiortc peers against a real server on an ephemeral loopback port.

Received frames are identified by content: the tiny random model is deterministic, so each decoded
frame is matched (after undoing the display upscale) against frames computed here with the same
model; a match names its frame index and prompt exactly. Helpers here are shared with
test_python_client.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
import torch
from aiortc import RTCConfiguration, RTCPeerConnection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients" / "python"))

from streamgen_client import ControlError, ReceivedFrame, ServerError, StreamClient  # noqa: E402

from streamgen.bundles.bundle import load_bundle  # noqa: E402
from streamgen.engine.frame_stream import FrameStream  # noqa: E402
from streamgen.serve import limits  # noqa: E402
from streamgen.serve.config import ServeConfig  # noqa: E402
from streamgen.serve.frames import Frame, FrameQueue  # noqa: E402
from streamgen.serve.ice import ice_servers  # noqa: E402
from streamgen.serve.limits import check_exposure  # noqa: E402
from streamgen.serve.server import Server  # noqa: E402
from streamgen.serve.track import PacedVideoTrack  # noqa: E402

MATCH = 12.0  # mean |Δ| per 8-bit value, after block-averaging: codec error ≈ 2, another frame ≈ 57


# --- helpers -------------------------------------------------------------------------------------
def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(**settings) -> AsyncIterator[Server]:
    async with Server(ServeConfig(**{"port": 0, "grace_s": 3.0, "model": "tiny-random", **settings})) as server:
        yield server


class Reference:
    """The frames a server stream of this prompt makes (optionally switching prompt at a frame)."""

    _bundle = None

    def __init__(self, prompt: str, frames: int, switch: tuple[int, str] | None = None, seed: int = 0) -> None:
        if Reference._bundle is None:
            Reference._bundle = load_bundle("tiny-random")
        stream = FrameStream(Reference._bundle, prompt, {"seed": seed})
        chunks, first, threads = [], 0, torch.get_num_threads()
        torch.set_num_threads(1)  # as the test servers run it (and far faster than 2 threads on a busy 2-core box)
        try:
            while first < frames:
                if switch is not None and first == switch[0]:
                    stream.set_prompt(switch[1])
                chunk = stream.next()
                chunks.append(chunk.frames.numpy().astype(np.float32))
                first += len(chunk.frames)
        finally:
            torch.set_num_threads(threads)
        self.frames = np.concatenate(chunks)  # [N, h, w, 3]

    def small(self, image: np.ndarray) -> np.ndarray:
        """A received image block-averaged back to model size (undoes the display upscale, halves codec noise)."""
        h, w = self.frames.shape[1:3]
        scale = image.shape[0] // h
        return image.reshape(h, scale, w, scale, 3).mean(axis=(1, 3), dtype=np.float32)

    def errors(self, image: np.ndarray) -> np.ndarray:
        """Mean |Δ| of a received image against every frame."""
        return np.abs(self.frames - self.small(image)).mean(axis=(1, 2, 3))

    def toward(self, image: np.ndarray, index: int, other: Reference) -> float:
        """How far a received frame moved from this reference toward `other` at `index` (0: here, 1: there);
        codec noise does not correlate with the difference, so this stays sharp when the two are close."""
        delta = other.frames[index] - self.frames[index]
        return float(((self.small(image) - self.frames[index]) * delta).sum() / (delta * delta).sum())

    def identify(self, frame: ReceivedFrame) -> int | None:
        """The index of the reference frame this received frame shows, or None."""
        errors = self.errors(frame.image)
        best = int(np.argmin(errors))
        return best if errors[best] < MATCH else None


async def offer_sdp() -> str:
    """A real aiortc offer (receive-only video + control channel) for HTTP-level tests."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def post(url: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as http, http.post(url + "/offer", data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url + path, headers=headers) as r:
        return r.status, await r.text()


async def frames_for(client: StreamClient, seconds: float) -> list[ReceivedFrame]:
    frames, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        frames.append(await client.next_frame())
    return frames


def coarse(image: np.ndarray, size: int = 32) -> np.ndarray:
    """An image block-averaged to size × size (codec noise averages out; the model's frames stay far apart)."""
    h, w = image.shape[:2]
    return image.reshape(size, h // size, size, w // size, 3).mean(axis=(1, 3), dtype=np.float32)


def is_fresh(previous: ReceivedFrame, frame: ReceivedFrame) -> bool:
    """A new frame, not the held one re-sent: consecutive model frames differ by ≈ 50+ (mean |Δ| at 32×32),
    a held frame re-encoded by codec noise only (< 3)."""
    return float(np.abs(coarse(frame.image) - coarse(previous.image)).mean()) > MATCH


async def fresh_frames(client: StreamClient, n: int, hang_s: float = 60.0) -> list[ReceivedFrame]:
    """Every frame received until `n` fresh ones (see is_fresh; each against the frame before it) followed
    the first. A count, not a rate: `hang_s` only stops a stream that stopped from blocking the suite."""
    frames: list[ReceivedFrame] = []

    async def collect() -> None:
        fresh = 0
        while fresh < n:
            frame = await client.next_frame(timeout=hang_s)
            fresh += bool(frames) and is_fresh(frames[-1], frame)
            frames.append(frame)

    try:
        await asyncio.wait_for(collect(), hang_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"hung: {len(frames)} frames but not {n} fresh ones within {hang_s:g} s") from None
    return frames


def fresh_steps(frames: list[ReceivedFrame]) -> list[bool]:
    """For each frame after the first: is it fresh against the one before it?"""
    return [is_fresh(a, b) for a, b in zip(frames, frames[1:])]


def assert_in_order(frames: list[ReceivedFrame], seen: list[int | None]) -> None:
    """Received frames are consecutive on the client (no gap, no repeat: `seq`), on the sender's clock in
    order (`pts` strictly increasing), and show the model's frames in order: each fresh frame a later frame
    than the one before it, each held one the same frame again."""
    assert [f.seq for f in frames] == list(range(frames[0].seq, frames[0].seq + len(frames)))
    assert all(b.pts > a.pts for a, b in zip(frames, frames[1:])), [f.pts for f in frames]
    assert None not in seen, seen
    steps = [b > a if fresh else b == a for a, b, fresh in zip(seen, seen[1:], fresh_steps(frames))]
    assert all(steps), list(zip(seen, [None] + fresh_steps(frames)))


async def until(check: Callable[[], object], seconds: float, step: float = 0.1) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return True
        await asyncio.sleep(step)
    return False


async def notice(client: StreamClient, seconds: float = 5.0) -> dict:
    """The next unsolicited message (error replies to raw sends land there)."""
    assert await until(lambda: client.notices, seconds), "no reply from the server"
    return client.notices.pop(0)


# --- sessions --------------------------------------------------------------------------------------
def test_two_sessions_stay_independent() -> None:
    async def main():
        async with serving() as server:
            async with StreamClient(server.url, prompt="a red fox") as a, StreamClient(server.url, prompt="a blue whale") as b:
                await fresh_frames(a, 8)
                ack = await a.send_prompt("a green field")
                got_a, got_b = await asyncio.gather(fresh_frames(a, 24), fresh_frames(b, 24))
                assert b.notices == [] and ack["of"] == "prompt"  # A's prompt is acked on A only
                sa, sb = await a.session(), await b.session()
                _, metrics = await get(server.url, "/metrics")
        return ack, got_a, got_b, sa, sb, metrics

    ack, got_a, got_b, sa, sb, metrics = run(main())
    assert sa["session_id"] != sb["session_id"] and (sa["prompt"], sb["prompt"]) == ("a green field", "a blue whale")
    n, switch = max(sa["frame"], sb["frame"]) + 40, (ack["frame"], "a green field")
    fox, whale = Reference("a red fox", n), Reference("a blue whale", n)
    fox_then_field, whale_then_field = Reference("a red fox", n, switch), Reference("a blue whale", n, switch)
    a_seen = [(f, fox_then_field.identify(f)) for f in got_a]
    b_seen = [(f, whale.identify(f)) for f in got_b]
    assert all(i is not None for _, i in a_seen + b_seen)
    assert_in_order(got_a, [i for _, i in a_seen])  # each session's frames in order, fresh ones advancing
    assert_in_order(got_b, [i for _, i in b_seen])
    def moved(ref: Reference, seen: list, other: Reference, target: float) -> bool:
        """Frames sit `target` of the way from `ref` to `other` (0: on ref, 1: on other), each one and on average."""
        values = np.array([ref.toward(f.image, i, other) for f, i in seen])
        return len(values) > 0 and abs(values.mean() - target) < 0.25 and bool(np.all(np.abs(values - target) < 0.5))

    before, after = [(f, i) for f, i in a_seen if i < ack["frame"]], [(f, i) for f, i in a_seen if i >= ack["frame"]]
    # Same seed, different prompts: each session shows its own prompt's frames (0), not the other's (1).
    assert moved(fox, before, whale, 0.0) and moved(fox, b_seen, whale, 1.0)
    # A's prompt change shows in A from its acked frame on, and never in B.
    assert len(after) >= 8 and moved(fox, after, fox_then_field, 1.0)
    assert moved(whale, [(f, i) for f, i in b_seen if i >= ack["frame"]], whale_then_field, 0.0)
    assert {"streamgen_sessions", "streamgen_frames_sent_total", "streamgen_frames_dropped_total",
            "streamgen_chunk_latency_seconds_bucket"} <= set(re.findall(r"^(\w+)", metrics, re.M))


def test_dropped_peer_frees_its_session() -> None:
    async def main() -> None:
        async with serving(grace_s=1.0) as server:
            client = StreamClient(server.url, prompt="a red fox")
            await client.connect()
            await client.next_frame()
            sid = client.session_id
            assert server.backend.stats()["streams"] == 1
            await client.drop()  # peer connection closed, no DELETE: the server must notice by itself
            assert await until(lambda: server.manager.get(sid) is None or server.manager.get(sid).state == "detached", 3)
            assert await until(lambda: server.backend.stats()["streams"] == 0, 5), "backend stream not closed"
            status, _ = await get(server.url, f"/sessions/{sid}")
            assert status == 404
            await client.close(delete=False)

    run(main())


# --- bad input -------------------------------------------------------------------------------------
def test_bad_http_input_gets_clear_answers() -> None:
    async def main() -> None:
        async with serving(max_sessions=1, max_sessions_per_ip=1) as server:
            url, sdp = server.url, await offer_sdp()
            cases = [
                (b"{not json", 400, "not valid JSON"),
                (b"[1, 2]", 400, "JSON object"),
                ({"sdp": "hello", "type": "offer"}, 400, "malformed SDP"),
                ({"sdp": "v=0\r\nm=video\r\n", "type": "offer"}, 400, "malformed SDP"),
                ({"sdp": sdp, "type": "offer", "colour": "red", "fps": 3}, 422, "unknown fields 'colour', 'fps'"),
                ({"sdp": sdp, "type": "offer", "prompt": "x" * 501}, 422, "limit is 500"),
                ({"sdp": sdp, "type": "offer", "params": {"guidance": 7}}, 422,
                 "unknown parameter 'guidance' (known: seed, steps, transition)"),
                ({"sdp": sdp, "type": "offer", "session_id": "nope"}, 404, "no session 'nope'"),
                ({"type": "offer"}, 422, "missing field 'sdp'"),
                (b"x" * 300_000, 413, "too large"),
            ]
            for body, status, words in cases:
                got, reply = await post(url, body)
                assert (got, words in reply.get("error", "")) == (status, True), (body if isinstance(body, bytes) else
                                                                                 {**body, "sdp": "…"}, got, reply)
            async with StreamClient(url, prompt="a red fox"):
                got, reply = await post(url, {"sdp": sdp, "type": "offer"})  # per-address limit first
                assert got == 429 and "limit 1 per address" in reply["error"]
                server.config.max_sessions_per_ip = 5
                got, reply = await post(url, {"sdp": sdp, "type": "offer"})
                assert got == 503 and "at capacity" in reply["error"], reply
            status, body = await get(url, "/nowhere")
            assert status == 404 and "no such endpoint" in body
            assert (await get(url, "/health"))[0] == 200

    run(main())


def test_bad_control_messages_get_errors_and_the_stream_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> tuple[list[ReceivedFrame], list[dict]]:
        async with serving() as server, StreamClient(server.url, prompt="a red fox") as client:
            await client.next_frame()
            for raw, words in [("not json", "not valid JSON"),
                               ('{"type": "dance"}', "unknown message type 'dance' (known: prompt, params, pause"),
                               ('{"type": "prompt", "prompt": "' + "x" * 600 + '"}', "limit is 500"),
                               ('{"type": "prompt", "prompt": "a", "volume": 3}', "unknown field 'volume'"),
                               ('{"type": "params", "params": {"guidance": 7}}',
                                "unknown parameter 'guidance' (known: seed, steps, transition)"),
                               ('{"type": "params", "params": {}}', "sets nothing"),
                               ("x" * 5000, "exceeds the 4096-byte limit")]:
                client.send_raw(raw)
                reply = await notice(client)
                assert reply["type"] == "error" and words in reply["message"], (raw[:40], reply)
            with pytest.raises(ControlError, match="unknown parameter"):
                await client.set_params(cfg=2)
            assert (await client.set_params(seed=3))["of"] == "params"

            paused = await client.pause()
            client.drain()
            held = [await client.next_frame() for _ in range(6)][2:]  # past frames still in the decoder
            assert all(np.abs(f.image.astype(int) - held[0].image).mean() < 3 for f in held)  # the frame is held
            assert paused["of"] == "pause" and (await client.resume())["of"] == "resume"
            blend = await client.send_prompt("a red fox", transition={"kind": "blend", "chunks": 3, "interpolation": "slerp"})
            assert blend["of"] == "prompt"
            assert (await client.reset())["frame"] == 0
            after_reset = [await client.next_frame() for _ in range(12)]

            # A burst past the limit (20 messages/s, bursts of 20) is refused message by message, not by a
            # disconnect. The bucket's clock stands still during the burst (however slowly this box handles
            # it), so exactly the first 20 fit and the other 10 are refused, each answered under its own id.
            await asyncio.sleep(1.0)  # a full token bucket
            client.notices.clear()
            burst = [f"burst-{k}" for k in range(30)]
            frozen = time.monotonic()
            monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: frozen))
            for msg_id in burst:
                client.send_raw(json.dumps({"type": "pause", "id": msg_id}))
            assert await until(lambda: len(client.notices) >= len(burst), 30), f"hung: replies {client.notices}"
            monkeypatch.undo()  # the bucket's clock runs again
            await asyncio.sleep(1.0)  # and refills
            await client.resume()  # answered after every reply to the burst (one channel, handled in order)
            replies = [n for n in client.notices if str(n.get("id")).startswith("burst-")]
            client.drain()
            await client.next_frame()
            assert (await get(server.url, "/health"))[0] == 200
        return after_reset, replies

    after_reset, replies = run(main())
    assert [r.get("id") for r in replies] == [f"burst-{k}" for k in range(30)], replies  # one each, in order
    assert all(r["type"] == "ack" and r["of"] == "pause" for r in replies[:20]), replies[:20]
    assert all(r["type"] == "error" and r["of"] == "pause" and "rate limit: at most 20 control messages per second"
               in r["message"] for r in replies[20:]), replies[20:]
    restarted = Reference("a red fox", 30, seed=3)  # reset keeps the prompt and params, restarts at frame 0
    seen = [restarted.identify(f) for f in after_reset]
    start = next(k for k, i in enumerate(seen) if i is not None and i < 6)
    assert start <= 8 and seen[start:] == sorted(seen[start:]) and None not in seen[start:]


def test_token_guards_the_api_but_not_health(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(token="s3cret", web_root=tmp_path) as server:
            sdp = await offer_sdp()
            assert (await post(server.url, {"sdp": sdp, "type": "offer"}))[0] == 401
            assert (await post(server.url, {"sdp": sdp, "type": "offer"}, {"Authorization": "Bearer nope"}))[0] == 401
            assert (await get(server.url, "/metrics"))[0] == 401
            assert (await get(server.url, "/health"))[0] == 200
            with pytest.raises(ServerError, match="401"):
                await StreamClient(server.url, token="wrong").connect()
            async with StreamClient(server.url, prompt="a red fox", token="s3cret", codec="h264") as client:
                frame = await client.next_frame()
                assert frame.image.shape == (256, 256, 3) and (await client.session())["codec"] == "h264"
            assert Reference("a red fox", 12).identify(frame) is not None  # H.264 carries the same frames
            status, text = await get(server.url, "/")
            assert status == 404 and "index.html does not exist" in text
            (tmp_path / "index.html").write_text("<h1>hi</h1>")
            (tmp_path / "app.js").write_text("1")
            assert await get(server.url, "/") == (200, "<h1>hi</h1>")
            assert await get(server.url, "/static/app.js") == (200, "1")
            status, text = await get(server.url, "/static/..%2F..%2FREADME.md")
            assert status == 404 and "no static file" in text, text

    run(main())


@pytest.mark.parametrize("source", ["env", "file"])
def test_cli_serve_with_token(source, tmp_path) -> None:
    """The token comes from $STREAMGEN_TOKEN or --token-file, never argv (visible in `ps`)."""
    env = {k: v for k, v in os.environ.items() if k != "STREAMGEN_TOKEN"}
    argv = [sys.executable, "-m", "streamgen.cli", "serve", "--port", "0", "--model", "tiny-random"]
    if source == "env":
        env["STREAMGEN_TOKEN"] = "t0k"
    else:
        (tmp_path / "token").write_text("t0k\n")
        argv += ["--token-file", str(tmp_path / "token")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+", line).group(0)

        async def main() -> None:
            assert (await post(url, {"sdp": await offer_sdp(), "type": "offer"}))[0] == 401
            async with StreamClient(url, token="t0k") as client:
                await client.next_frame()
        run(main())
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, proc.stderr.read()


def test_cli_serve_refuses_an_exposed_bind_without_a_token(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "STREAMGEN_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "streamgen.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 2 and "refusing to bind 0.0.0.0 without a token" in done.stderr, done.stderr
    (tmp_path / "empty").write_text("")
    done = subprocess.run([sys.executable, "-m", "streamgen.cli", "serve", "--token-file", str(tmp_path / "empty")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 2 and "is empty" in done.stderr, done.stderr
    with pytest.raises(ValueError, match="without a token"):
        check_exposure("10.0.0.1", None)
    check_exposure("10.0.0.1", "t")
    check_exposure("::1", None)


def test_ice_server_urls() -> None:
    stun, turn = ice_servers(["stun:stun.example.org:3478", "turn:alice:p%40ss@turn.example.org:3478?transport=udp"])
    assert (stun.urls, stun.username) == ("stun:stun.example.org:3478", None)
    assert (turn.urls, turn.username, turn.credential) == ("turn:turn.example.org:3478?transport=udp", "alice", "p@ss")
    with pytest.raises(ValueError, match="must start with stun:"):
        ice_servers(["http://example.org"])


# --- the track on its own -----------------------------------------------------------------------------
def test_late_track_drops_stale_frames_instead_of_lagging() -> None:
    class Source:
        def __init__(self) -> None:
            self.queue, self.paused, self.last, self.sent = FrameQueue(asyncio.get_running_loop()), False, None, []

        def on_sent(self, frame: Frame, new: bool, dropped: int) -> None:
            self.last = frame
            self.sent.append((frame.index, new, dropped))

        def on_packet(self, packet: int, encoder: object) -> None:  # what a recording would keep
            pass

    class Encoder:
        def encode(self, image: np.ndarray, tick: int) -> int:
            return tick

    async def main() -> None:
        source = Source()
        source.queue.put([Frame(i, np.zeros((2, 2, 3), np.uint8), 0.0) for i in range(20)])
        track = PacedVideoTrack(source, Encoder(), fps=50.0)
        assert await track.recv() == 0
        await asyncio.sleep(0.2)  # 10 ticks late
        tick = await track.recv()
        index, new, dropped = source.sent[-1]
        assert tick >= 10 and dropped >= 9 and index == 1 + dropped  # skipped ahead, stayed on the clock
        source.queue.flush()
        assert await track.recv() == tick + 1 and source.sent[-1][:2] == (index, False)  # nothing new: held

    run(main())
