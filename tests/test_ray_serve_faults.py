"""A Ray stage killed mid-stream, seen through the server: viewers get a `stall` and the stream goes on.

`serve --backend ray` (in process, tpp mode: 2 stage actors + a decoder on the fixture's local cluster)
streams to two viewers — the Python client library and the `streamgen client` command — while a stage
actor is killed with `ray.kill`. The pipeline replaces the actor and re-caches every session
(streamgen/backends/ray/pipeline.py); the server must forward that recovery to each viewer as a `stall`
message, count it in /metrics, keep sending new frames, and keep admitting new sessions.
"""
from __future__ import annotations

import asyncio
import re
import time

import pytest

ray = pytest.importorskip("ray")

from streamgen_client.cli import run as run_client_command  # noqa: E402  (path set up by test_serve)

from .test_ray_e2e import RAY  # noqa: E402
from .test_serve import StreamClient, frames_for, get, run, serving, until  # noqa: E402

WATCH_S = 30.0  # how long the `streamgen client` viewer watches: the kill, the recovery and the frames after


def test_killed_stage_reaches_viewers_as_a_stall_and_the_stream_goes_on(ray_address, capsys) -> None:
    async def main():
        async with serving(backend="ray", ray={**RAY, "ray_address": ray_address}) as server:
            pipe = server.backend.pipelines[0]
            async with StreamClient(server.url, prompt="a red fox") as client:
                await client.next_frame(timeout=30)
                command = asyncio.ensure_future(run_client_command(server.url, "a blue whale", WATCH_S, [], None, None))
                assert await until(lambda: len(pipe.sessions) == 2, 30), "the command's session did not start"
                await frames_for(client, 1.0)
                shown = (await client.session())["frame"]
                old = pipe.stages[1]
                ray.kill(old)
                killed = time.monotonic()
                assert await until(lambda: client.stalls, 60), "no stall message within 60 s of the kill"
                stall_s = time.monotonic() - killed
                client.drain()
                before = await client.session()
                after = await frames_for(client, 2.0)
                view, stats = await client.session(), client.stats
                await asyncio.wait_for(command, WATCH_S + 30)  # ends by itself: it saw the recovery too
            health = await get(server.url, "/health")
            async with StreamClient(server.url, prompt="a green field") as newcomer:  # the repaired pipeline admits
                newcomer_frame = await newcomer.next_frame(timeout=30)
                newcomer_view = await newcomer.session()
            _, metrics = await get(server.url, "/metrics")
            replaced = pipe.stages[1] is not old
        return (shown, client.stalls, stall_s, before, after, view, stats, health, newcomer_frame, newcomer_view,
                metrics, replaced, server.backend.bundle.fps)

    t0 = time.monotonic()
    (shown, stalls, stall_s, before, after, view, stats, health, newcomer_frame, newcomer_view, metrics, replaced,
     fps) = run(main(), timeout=240)
    output = capsys.readouterr().out
    print(f"\nserve + kill: {time.monotonic() - t0:.1f} s; stall {stall_s:.1f} s after the kill: {stalls}\n{output}")

    [stall] = stalls
    assert stall["type"] == "stall" and stall["reason"] and "stage1" in stall["replaced"] and stall["events"] == 1
    assert 0 < stall["recovery_s"] < 60 and replaced
    assert stall["frame"] > shown  # the first frame after the recovery: later than anything shown before the kill
    # The stream goes on: new frames (not the held last one) past the stall, on the server and on screen.
    assert view["state"] == "streaming" and view["frame"] > stall["frame"] and view["stalls"] == 1
    assert view["frames"]["sent"] - before["frames"]["sent"] >= 0.5 * 2.0 * fps, (before, view)
    assert len(after) >= 0.6 * 2.0 * fps and stats["frame"] > stall["frame"]  # the client's own view: stats
    # The other viewer (the `streamgen client` command) was rewound too, and printed its stall.
    assert re.search(r"stall at frame \d+ \(\d+\.\d s\): .+ \[replaced stage1\]", output), output
    assert re.search(rf"^\d+ frames in {WATCH_S:g} s", output, re.M), output
    assert health[0] == 200
    assert newcomer_frame.image.shape == (256, 256, 3) and newcomer_view["state"] == "streaming"
    assert newcomer_view["stalls"] == 0
    assert re.search(r"^streamgen_stalls_total 2$", metrics, re.M), metrics  # one per session of the pipeline
