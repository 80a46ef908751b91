"""Render outputs beyond MP4: an HLS playlist that ffprobe plays with the right duration, and a live RTMP push
received by a real RTMP peer (`ffmpeg -listen 1`) with monotonic timestamps at the model's frame rate."""
from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import av
import pytest

from streamgen.cli import main
from streamgen.render.writer import VideoWriter, parse_output

HANG_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, peer: subprocess.Popen) -> None:
    """Until `peer` listens on `port` (seen with `ss`: a test connection would take its one client slot)."""
    end = time.monotonic() + HANG_S
    while time.monotonic() < end and peer.poll() is None:
        if f":{port} " in subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout:
            return
        time.sleep(0.05)
    raise AssertionError(f"the RTMP peer never listened on {port}: {peer.stderr.read().decode() if peer.stderr else ''}")


def ffprobe(target: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=codec_name,has_b_frames",
                          "-of", "json", str(target)], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_outputs_are_mp4_hls_or_rtmp_and_nothing_else() -> None:
    assert parse_output("a/b.MP4").kind == "mp4" and parse_output("x.m3u8").kind == "hls"
    assert parse_output("rtmp://127.0.0.1:1935/live/key").kind == "rtmp"
    for bad, reason in (("out.mkv", "MP4"), ("rtmp:///live", "host"), ("out", "(none)")):
        with pytest.raises(ValueError, match=reason):
            parse_output(bad)


def test_render_to_hls_plays_with_the_right_duration(tmp_path, capsys) -> None:
    playlist = tmp_path / "show.m3u8"
    assert main(["render", "--model", "tiny-random", "--prompt", "a red fox", "--seconds", "6", "-o", str(playlist),
                 "--quiet"]) == 0
    segments = sorted(tmp_path.glob("show_*.ts"))
    assert len(segments) >= 3  # 2 s segments
    probe = ffprobe(playlist)
    assert abs(float(probe["format"]["duration"]) - 6.0) <= 0.25
    assert probe["streams"][0]["codec_name"] == "h264" and probe["streams"][0]["has_b_frames"] == 0
    with av.open(str(playlist)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 96  # 6 s × 16 fps


def test_an_aborted_hls_output_leaves_no_playlist_or_segments(tmp_path) -> None:
    import numpy as np

    writer = VideoWriter(tmp_path / "bad.m3u8", 16.0)
    writer.write(np.zeros((80, 32, 32, 3), np.uint8))  # 5 s: segments are already on disk
    assert list(tmp_path.glob("bad_*.ts"))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_render_pushes_rtmp_live_to_a_real_rtmp_peer(tmp_path) -> None:
    port = free_port()
    received = tmp_path / "received.flv"
    url = f"rtmp://127.0.0.1:{port}/live/test"
    peer = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-listen", "1", "-i", url, "-c", "copy",
                             "-f", "flv", str(received)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, peer)
        assert main(["render", "--model", "tiny-random", "--prompt", "a red fox", "--seconds", "10.5", "-o", url,
                     "--quiet"]) == 0
        peer.wait(HANG_S)
    finally:
        if peer.poll() is None:
            peer.kill()
    assert peer.returncode == 0, peer.stderr.read().decode()
    with av.open(str(received)) as c:
        stream = c.streams.video[0]
        pts = [f.pts for f in c.decode(stream)]
        time_base = float(stream.time_base)
    assert len(pts) == 168  # 10.5 s × 16 fps, none lost
    assert all(b > a for a, b in zip(pts, pts[1:]))  # monotonic
    steps = {round((b - a) * time_base * 16, 3) for a, b in zip(pts, pts[1:])}
    assert steps <= {1.0, 0.992, 1.008, 1.024, 0.976}  # one frame at 16 fps (FLV has millisecond timestamps)
    assert (pts[-1] - pts[0]) * time_base >= 10.0


def test_a_sessions_packets_are_published_to_an_allowed_rtmp_peer(tmp_path) -> None:
    import numpy as np

    from streamgen.errors import InputError
    from streamgen.serve.encoder import VideoEncoder
    from streamgen.serve.publish import Publication, PublishPolicy

    policy = PublishPolicy(("127.0.0.1",))
    for url, reason in (("rtmp://evil.example/live/k", "not one this server"), ("http://127.0.0.1/x", "rtmp://"),
                        ("rtmp:///x", "rtmp://")):
        with pytest.raises(InputError, match=reason):
            policy.check(url)
    with pytest.raises(InputError, match="publishing is off"):
        PublishPolicy().check("rtmp://127.0.0.1/live/k")
    with pytest.raises(InputError, match="H.264"):
        Publication("rtmp://127.0.0.1/live/k", "vp8", 16.0, print)
    port = free_port()
    received = tmp_path / "session.flv"
    url = policy.check(f"rtmp://127.0.0.1:{port}/live/session")
    peer = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-listen", "1", "-i", url, "-c", "copy",
                             "-f", "flv", str(received)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors: list[str] = []
    try:
        wait_listening(port, peer)
        encoder = VideoEncoder("h264", 16.0, None, 2.0)
        publication = Publication(url, "h264", 16.0, errors.append)
        for tick in range(48):  # 3 s: the first packet is a keyframe, the rest follow as the track sends them
            packet = encoder.encode(np.full((64, 64, 3), tick * 5, np.uint8), tick)
            publication.write(packet, encoder)
        publication.stop()
        peer.wait(HANG_S)
    finally:
        if peer.poll() is None:
            peer.kill()
    assert not errors and peer.returncode == 0
    assert publication.describe()["url"].endswith("/live/…")  # the stream key is not shown
    with av.open(str(received)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 48


def test_a_live_session_is_published_to_a_real_rtmp_peer_only_when_allowed(tmp_path) -> None:
    import asyncio

    import aiohttp

    from .test_serve import StreamClient, run, serving, until

    port = free_port()
    received = tmp_path / "live.flv"
    url = f"rtmp://127.0.0.1:{port}/live/secret-key"

    async def call(server_url: str, sid: str, body: dict) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http, http.post(f"{server_url}/sessions/{sid}/publish", json=body) as r:
            return r.status, await r.json(content_type=None)

    async def main(peer: subprocess.Popen):
        async with serving(codec="h264", publish_allow=("127.0.0.1",)) as server:
            async with StreamClient(server.url, prompt="a red fox", codec="h264") as client:
                await client.next_frame()
                sid = client.session_id
                refused = [await call(server.url, sid, {"url": "rtmp://elsewhere.example/live/k"}),
                           await call(server.url, sid, {"url": "http://127.0.0.1/x"}),
                           await call(server.url, sid, {"action": "stop"}),
                           await call(server.url, "nosuch", {"url": url})]
                started = await call(server.url, sid, {"url": url})
                again = await call(server.url, sid, {"url": url})
                assert await until(lambda: server.manager.get(sid).publication.frames >= 10 * 16, 90), "hung"
                stopped = await call(server.url, sid, {"action": "stop"})
                await asyncio.to_thread(peer.wait, HANG_S)
        async with serving(codec="h264") as off, StreamClient(off.url, prompt="a red fox", codec="h264") as client:
            await client.next_frame()
            disabled = await call(off.url, client.session_id, {"url": url})
        return refused, started, again, stopped, disabled

    peer = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-listen", "1", "-i", url, "-c", "copy",
                             "-f", "flv", str(received)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, peer)
        refused, started, again, stopped, disabled = run(main(peer))
    finally:
        if peer.poll() is None:
            peer.kill()
    assert [r[0] for r in refused] == [403, 400, 409, 404], refused
    assert "not one this server may publish to" in refused[0][1]["error"]
    assert started[0] == 200 and started[1]["publishing"] and "secret-key" not in json.dumps(started[1])
    assert again[0] == 409 and "already publishing" in again[1]["error"]
    assert stopped[0] == 200 and stopped[1]["publishing"] is False and stopped[1]["frames"] >= 160
    assert disabled[0] == 403 and "publishing is off" in disabled[1]["error"]
    with av.open(str(received)) as c:
        stream = c.streams.video[0]
        pts = [f.pts for f in c.decode(stream)]
        seconds = (pts[-1] - pts[0]) * float(stream.time_base)
    assert len(pts) >= 160 and seconds >= 10.0 - 1 / 16 and all(b > a for a, b in zip(pts, pts[1:]))
