"""The Python client against a real server: frame rate, prompt acks and their effect, resume, MP4, CLI."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from .test_serve import ROOT, Reference, frames_for, run, serving

from streamgen_client import StreamClient  # noqa: E402  (path set up by test_serve)
from streamgen_client.cli import parse_schedule  # noqa: E402


def test_frames_arrive_at_the_model_rate_and_a_prompt_changes_them(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"

    async def main():
        async with serving() as server:
            fps = server.backend.bundle.fps
            async with StreamClient(server.url, prompt="a red fox", record=str(out)) as client:
                frames = [await client.next_frame()] + await frames_for(client, 2.0)
                shown = (await client.session())["frame"]  # the newest frame sent so far
                ack = await client.send_prompt("a green field")
                after = await frames_for(client, 1.5)
                received, first_frame_s, stats = client.frames_received, client.first_frame_s, client.stats
        return fps, frames, shown, ack, after, received, first_frame_s, stats

    fps, frames, shown, ack, after, received, first_frame_s, stats = run(main())
    assert stats["frame"] > 0 and abs(stats["fps"] - fps) < 0.35 * fps and stats["queue_depth"] >= 0
    intervals = np.diff([f.time for f in frames])
    print(f"\nfirst frame {1000 * first_frame_s:.0f} ms; inter-frame p50 {1000 * np.percentile(intervals, 50):.1f} ms, "
          f"p95 {1000 * np.percentile(intervals, 95):.1f} ms, mean {1000 * intervals.mean():.1f} ms (1/fps = {1000 / fps:.1f})")
    assert abs(intervals.mean() - 1 / fps) < 0.35 / fps
    assert first_frame_s < 3.0

    n = max(shown, ack["frame"]) + 40
    before_change = Reference("a red fox", n)
    with_change = Reference("a red fox", n, switch=(ack["frame"], "a green field"))
    seen = [before_change.identify(f) for f in frames]
    assert None not in seen and seen == sorted(seen)  # the model's frames, in order
    assert ack["of"] == "prompt" and ack["frame"] >= shown >= max(seen)  # lands after everything already received
    assert np.array_equal(with_change.frames[: ack["frame"]], before_change.frames[: ack["frame"]])
    changed = [(f, with_change.identify(f)) for f in after]
    changed = [(f, i) for f, i in changed if i is not None and i >= ack["frame"]]
    assert len(changed) >= 8, "too few frames after the prompt change"
    moved = [before_change.toward(f.image, i, with_change) for f, i in changed]
    print(f"prompt change: frames moved {np.mean(moved):.2f} (min {np.min(moved):.2f}) of the way to the new prompt's frames")
    assert abs(np.mean(moved) - 1) < 0.25 and min(moved) > 0.5  # they show the new prompt, not the old one

    with av.open(str(out)) as container:
        decoded = [f for f in container.decode(video=0)]
    assert abs(len(decoded) - received) <= 2 and (decoded[0].height, decoded[0].width) == (256, 256)


def test_reconnect_within_grace_resumes_the_same_stream() -> None:
    async def main():
        async with serving() as server:
            client = StreamClient(server.url, prompt="a red fox")
            await client.connect()
            first = await frames_for(client, 1.0)
            sid = client.session_id
            await client.drop()  # the connection goes away; the session waits for us
            await asyncio.sleep(0.5)
            state = server.manager.get(sid).state
            await client.connect()  # same object, same session_id
            second = await frames_for(client, 1.0)
            await client.drop()
            # A new client (a reloaded page) resuming with its session_id and a prompt of its own.
            async with StreamClient(server.url, session_id=sid, prompt="a green field") as again:
                third = await frames_for(again, 1.5)
                notices = again.notices
            resumed = server.metrics.value("streamgen_sessions_resumed_total")
            await client.close(delete=False)
        return sid, again.session_id, state, first, second, third, notices, resumed

    sid, sid_again, state, first, second, third, notices, resumed = run(main())
    assert sid_again == sid and state == "detached" and resumed == 2
    [ack] = [n for n in notices if n["type"] == "ack"]  # the prompt the resuming offer carried
    assert ack["of"] == "prompt"
    ref = Reference("a red fox", 150, switch=(ack["frame"], "a green field"))
    seen = [[ref.identify(f) for f in frames] for frames in (first, second, third)]
    assert all(None not in s and s == sorted(s) for s in seen)
    assert max(seen[0]) > 0 and min(seen[1]) >= max(seen[0]) and min(seen[2]) >= max(seen[1])  # continues, not from 0
    unchanged = Reference("a red fox", 150)
    moved = [unchanged.toward(f.image, i, ref) for f, i in zip(third, seen[2], strict=True) if i >= ack["frame"]]
    assert len(moved) >= 8 and abs(np.mean(moved) - 1) < 0.25


def test_client_command_follows_a_schedule(tmp_path: Path) -> None:
    out = tmp_path / "cli.mp4"

    async def main() -> str:
        async with serving() as server:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamgen.cli", "client", server.url, "--prompt", "a red fox", "--seconds", "2.5",
                "--schedule", "1:a blue square, with stripes,1.5:a green circle", "-o", str(out), cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            text = (await asyncio.wait_for(proc.communicate(), 40))[0].decode()
            assert proc.returncode == 0, text
            return text

    text = run(main())
    assert "prompt 'a blue square, with stripes': ack at frame" in text and "prompt 'a green circle': ack" in text
    assert out.stat().st_size > 0


def test_parse_schedule() -> None:
    assert parse_schedule("3:a blue square,6:a green circle") == [(3.0, "a blue square"), (6.0, "a green circle")]
    assert parse_schedule("6: late, with comma , 1.5:early") == [(1.5, "early"), (6.0, "late, with comma")]
    assert parse_schedule("") == []
    with pytest.raises(ValueError, match="SECONDS:PROMPT"):
        parse_schedule("soon:a cat")
