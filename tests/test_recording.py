"""Session recording against a real server and a real aiortc viewer: the file holds exactly the frames the
viewer was sent (the same packets, not a second encode), decodes with PyAV after a stop, and stays
playable when the server is killed with SIGKILL mid-recording."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import av
import pytest

from .test_serve import Reference, StreamClient, run, serving, until

FPS = 16  # tiny-random plays at 16 frames/s (asserted below against the bundle)


async def recording_call(url: str, sid: str, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(f"{url}/sessions/{sid}/recording", data=data) as r:
        return r.status, await r.json(content_type=None)


async def recorded_frames(url: str, sid: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/sessions/{sid}") as r:
        view = await r.json()
    return (view.get("recording") or {}).get("frames", 0)


def decode(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


@pytest.mark.parametrize("codec,suffix", [("vp8", ".webm"), ("h264", ".mp4")])
def test_a_recording_holds_the_frames_the_viewer_was_sent(tmp_path: Path, codec: str, suffix: str) -> None:
    async def main():
        async with serving(recordings_dir=tmp_path, codec=codec) as server:
            assert server.backend.bundle.fps == FPS
            async with StreamClient(server.url, prompt="a red fox", codec=codec) as client:
                await client.next_frame()
                sid = client.session_id
                started = await recording_call(server.url, sid, {"action": "start"})
                again = await recording_call(server.url, sid, {"action": "start"})  # already recording: the same one
                assert await until(lambda: server.manager.get(sid).recording.frames >= 10 * FPS, 60), "hung"
                stopped = await recording_call(server.url, sid, {"action": "stop"})
                async with aiohttp.ClientSession() as http, http.get(f"{server.url}/sessions/{sid}/recording") as r:
                    served = (r.status, r.headers["Content-Type"], await r.read())
        return started, again, stopped, served

    started, again, stopped, served = run(main())
    assert started[0] == 200 and started[1]["recording"] is True and started[1]["format"] == suffix[1:]
    assert again[0] == 200 and again[1]["started"] == started[1]["started"]
    assert stopped[0] == 200 and stopped[1]["recording"] is False and stopped[1]["frames"] >= 10 * FPS
    assert served[0] == 200 and served[1] == f"video/{suffix[1:]}"
    files = list(tmp_path.glob(f"*{suffix}"))
    assert len(files) == 1 and files[0].read_bytes() == served[2]
    frames = decode(files[0])
    assert len(frames) == stopped[1]["frames"]
    assert all(abs(f.time - k / FPS) <= 1e-3 for k, f in enumerate(frames))  # the viewer's pace, none lost
    ref = Reference("a red fox", 60 + len(frames))
    seen = [ref.identify(type("F", (), {"image": f.to_ndarray(format="rgb24")})) for f in frames]
    assert None not in seen and seen == sorted(seen) and seen[-1] > seen[0]  # the model's frames, in order


def test_recording_refusals(tmp_path: Path) -> None:
    async def main():
        async with serving() as off, StreamClient(off.url, prompt="a red fox") as client:
            await client.next_frame()
            disabled = await recording_call(off.url, client.session_id, {"action": "start"})
        async with serving(recordings_dir=tmp_path) as server, StreamClient(server.url, prompt="a red fox") as client:
            await client.next_frame()
            sid = client.session_id
            answers = [await recording_call(server.url, "nosuch", {"action": "start"}),
                       await recording_call(server.url, sid, b"not json"),
                       await recording_call(server.url, sid, {"action": "pause"}),
                       await recording_call(server.url, sid, {"action": "stop"})]
            async with aiohttp.ClientSession() as http, http.get(f"{server.url}/sessions/{sid}/recording") as r:
                none_yet = (r.status, await r.json())
            assert await until(lambda: client.frames_received > 2, 30)
        return disabled, answers, none_yet

    disabled, (unknown, not_json, bad_action, not_recording), none_yet = run(main())
    assert disabled[0] == 409 and "--recordings-dir" in disabled[1]["error"]
    assert unknown[0] == 404
    assert not_json[0] == 400 and "JSON" in not_json[1]["error"]
    assert bad_action[0] == 422 and "action" in bad_action[1]["error"]
    assert not_recording[0] == 409 and "not recording" in not_recording[1]["error"]
    assert none_yet[0] == 404 and "no recording" in none_yet[1]["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_recording_survives_the_server_being_killed(tmp_path: Path) -> None:
    """SIGKILL after ≥ 6 s recorded: the file on disk still decodes, with ≥ 5 s of frames."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", "import sys; from streamgen.cli import main; sys.exit(main())", "serve", "--port", str(port), "--model", "tiny-random",
                               "--recordings-dir", str(tmp_path / "rec")], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        async def main() -> int:
            async def up() -> bool:
                try:
                    async with aiohttp.ClientSession() as http, http.get(url + "/health") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            while not await up():
                assert server.poll() is None, "the server exited"
                await asyncio.sleep(0.1)
            async with StreamClient(url, prompt="a red fox") as client:
                await client.next_frame()
                status, _ = await recording_call(url, client.session_id, {"action": "start"})
                assert status == 200
                for _ in range(900):
                    if (recorded := await recorded_frames(url, client.session_id)) >= 6 * FPS:
                        break
                    await asyncio.sleep(0.1)
                server.send_signal(signal.SIGKILL)
                server.wait(30)
                await client.close(delete=False)
            return recorded

        recorded = run(main(), 300)  # a hang guard: the server starts, records 6 s, dies
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    assert recorded >= 6 * FPS, (tmp_path / "serve.log").read_text()[-2000:]
    files = list((tmp_path / "rec").glob("*.webm"))
    assert len(files) == 1
    frames = decode(files[0])
    print(f"\nkilled after {recorded} recorded frames; the file decodes to {len(frames)} frames")
    assert len(frames) >= 5 * FPS
