"""The Python client against a real server: frames in order, prompt acks and their effect, resume, MP4, CLI.

No wall-clock assertions: tests wait for counts of fresh frames (with hang guards) and check order and
counts; speed goals live in `streamgen bench` and benchmarks/ (the timings here are printed only)."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from streamgen_client import StreamClient  # noqa: E402  (path set up by test_serve)
from streamgen_client.cli import parse_prompts_at  # noqa: E402

from .test_serve import ROOT, Reference, assert_in_order, fresh_frames, fresh_steps, run, serving, until


def test_frames_arrive_in_order_and_a_prompt_changes_them(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"

    async def main():
        async with serving() as server:
            fps = server.backend.bundle.fps
            async with StreamClient(server.url, prompt="a red fox", record=str(out)) as client:
                frames = await fresh_frames(client, 32)  # the first frame and 32 new ones after it
                shown = (await client.session())["frame"]  # the newest frame sent so far
                ack = await client.send_prompt("a green field")
                after = await fresh_frames(client, 24)
                newest = (await client.session())["frame"]  # no frame received so far is later than this
                # the server's stats messages follow the stream: one reports the acked frame or a later one
                assert await until(lambda: client.stats is not None and client.stats["frame"] >= ack["frame"], 30), \
                    f"hung: no stats message at or past frame {ack['frame']} (latest {client.stats})"
                received, first_frame_s, stats = client.frames_received, client.first_frame_s, dict(client.stats)
        return fps, frames, shown, ack, after, newest, received, first_frame_s, stats

    fps, frames, shown, ack, after, newest, received, first_frame_s, stats = run(main())
    intervals = np.diff([f.time for f in frames])
    print(f"\nfirst frame {1000 * first_frame_s:.0f} ms; inter-frame p50 {1000 * np.percentile(intervals, 50):.1f} ms, "
          f"p95 {1000 * np.percentile(intervals, 95):.1f} ms, mean {1000 * intervals.mean():.1f} ms (1/fps = {1000 / fps:.1f}); "
          f"stats {stats}")  # informational: speed goals live in `streamgen bench`
    assert first_frame_s is not None and first_frame_s > 0 and frames[0].seq == 0  # measured, on the first frame
    assert stats["fps"] > 0 and stats["queue_depth"] >= 0 and ack["frame"] <= stats["frame"]
    assert received >= len(frames) + len(after)  # every frame looked at was counted

    n = max(shown, ack["frame"], newest) + 1
    before_change = Reference("a red fox", n)
    with_change = Reference("a red fox", n, switch=(ack["frame"], "a green field"))
    seen = [before_change.identify(f) for f in frames]
    assert None not in seen and seen == sorted(seen)  # the model's frames, in order
    assert_in_order(frames, seen)  # and each fresh frame a later one, each held one the same again
    assert len(set(seen)) == 1 + sum(fresh_steps(frames)) >= 33  # 33 distinct model frames
    assert ack["of"] == "prompt" and ack["frame"] >= shown >= max(seen)  # lands after everything already received
    assert np.array_equal(with_change.frames[: ack["frame"]], before_change.frames[: ack["frame"]])
    changed = [(f, with_change.identify(f)) for f in after]
    assert_in_order(after, [i for _, i in changed])
    changed = [(f, i) for f, i in changed if i >= ack["frame"]]
    assert len(changed) >= 8, "too few of 24 fresh frames after the prompt change show it"
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
            first = await fresh_frames(client, 16)
            sid = client.session_id
            await client.drop()  # the connection goes away; the session waits for us
            assert await until(lambda: (s := server.manager.get(sid)) is not None and s.state != "streaming", 30), \
                "hung: the server did not notice the dropped connection"
            state = server.manager.get(sid).state
            await client.connect()  # same object, same session_id
            second = await fresh_frames(client, 16)
            await client.drop()
            # A new client (a reloaded page) resuming with its session_id and a prompt of its own.
            async with StreamClient(server.url, session_id=sid, resume_token=client.resume_token,
                                    prompt="a green field") as again:
                third = await fresh_frames(again, 24)
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
    for frames, s in zip((first, second, third), seen):
        assert_in_order(frames, s)  # each connection's frames in order, fresh ones advancing
    assert max(seen[0]) > 0 and min(seen[1]) >= max(seen[0]) and min(seen[2]) >= max(seen[1])  # continues, not from 0
    unchanged = Reference("a red fox", 150)
    moved = [unchanged.toward(f.image, i, ref) for f, i in zip(third, seen[2], strict=True) if i >= ack["frame"]]
    assert len(moved) >= 8 and abs(np.mean(moved) - 1) < 0.25


def test_client_command_changes_prompts_at_set_times(tmp_path: Path) -> None:
    out = tmp_path / "cli.mp4"

    async def main() -> str:
        async with serving() as server:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamgen.cli", "client", server.url, "--prompt", "a red fox", "--seconds", "2.5",
                "--prompts-at", "1:a blue square, with stripes,1.5:a green circle", "-o", str(out), cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            text = (await asyncio.wait_for(proc.communicate(), 40))[0].decode()
            assert proc.returncode == 0, text
            return text

    text = run(main())
    assert "prompt 'a blue square, with stripes': ack at frame" in text and "prompt 'a green circle': ack" in text
    assert out.stat().st_size > 0


def test_client_command_warns_about_words_the_model_ignores() -> None:
    async def main() -> str:
        async with serving(model="embedded") as server:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamgen.cli", "client", server.url, "--prompt", "a red gizmo", "--seconds", "2",
                "--prompts-at", "0.5:a blue square dancing wildly", cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            text = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
            assert proc.returncode == 0, text
            return text

    warnings = [line for line in run(main()).splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: prompt 'a red gizmo': the model ignores 'gizmo'; understood as 'a red circle moving right'",
                        "warning: prompt 'a blue square dancing wildly': the model ignores 'dancing', 'wildly'; "
                        "understood as 'a blue square moving right'"], warnings


def test_parse_prompts_at() -> None:
    assert parse_prompts_at("3:a blue square,6:a green circle") == [(3.0, "a blue square"), (6.0, "a green circle")]
    assert parse_prompts_at("6: late, with comma , 1.5:early") == [(1.5, "early"), (6.0, "late, with comma")]
    assert parse_prompts_at("") == []
    with pytest.raises(ValueError, match="SECONDS:PROMPT"):
        parse_prompts_at("soon:a cat")
