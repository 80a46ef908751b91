"""The web client in headless Chromium against `serve --backend ray` (tpp: 2 stage actors + a decoder on
the fixture's local Ray cluster): the video plays, a prompt typed with Enter is acknowledged and shows in
the pixels, and a stage killed mid-stream shows as a stall over the video while frames go on.

Browser driving (raw DevTools protocol) comes from test_browser.py; the pixels are identified against
the in-process timestep-slot stream (test_ray_e2e.SlotReference), which is what a tpp pipeline computes.
"""
from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from streamgen.serve.config import ServeConfig  # noqa: E402

from .test_browser import (  # noqa: E402
    NEW_PROMPT,
    PROMPT,
    Env,
    capture,
    connected_page,
    identify,
    pytestmark,  # noqa: E402, F401  (skipped without Chromium, as test_browser is)
    until,
    video_progress,
)
from .test_ray_e2e import RAY, SlotReference  # noqa: E402

SIZE = 32  # tiny-random frames are 32×32, shown at 256×256


@pytest.fixture(scope="module")
def env(ray_address: str, tmp_path_factory: pytest.TempPathFactory):
    config = ServeConfig(port=0, grace_s=5.0, model="tiny-random", backend="ray", ray={**RAY, "ray_address": ray_address})
    env = Env(tmp_path_factory.mktemp("ray-browser"), config)
    yield env
    env.close()


def test_page_plays_takes_a_prompt_and_shows_a_stall_on_the_ray_backend(env: Env, tmp_path: Path) -> None:
    pipe = env.server.backend.pipelines[0]

    async def main():
        page = await connected_page(env)
        try:
            sid = await page.js("streamgen.sessionId")
            first = await video_progress(page)
            await asyncio.sleep(2.0)
            second = await video_progress(page)
            before = await capture(page, 12, SIZE)
            await page.type_and_enter("#prompt", NEW_PROMPT)
            ack = await page.wait_for("streamgen.acks.find(a => a.of === 'prompt')", 20, "the prompt's ack")
            after = await capture(page, 40, SIZE)
            prompt_view = env.server.manager.get(sid).describe()

            ray.kill(pipe.stages[0])
            killed = time.monotonic()
            badge = await page.wait_for("(s => !s.hidden && s.textContent)(document.getElementById('stall'))", 60,
                                        "the stall badge")
            shown_s = time.monotonic() - killed
            stall = (await page.js("streamgen.stalls"))[0]
            presented = await page.js("streamgen.presented")
            await page.wait_for(f"streamgen.presented > {presented} + 16", 10, "frames after the stall")
            stall_view = env.server.manager.get(sid).describe()
            await page.screenshot(tmp_path / "stall.png")
            log_text = await page.log_text()
            await page.js("document.getElementById('disconnect').click()")
            await until(lambda: not env.server.manager.sessions, 5)
            return first, second, before, ack, after, prompt_view, badge, shown_s, stall, stall_view, log_text, page.console
        finally:
            await page.close()

    first, second, before, ack, after, prompt_view, badge, shown_s, stall, stall_view, log_text, console = \
        env.run(main(), 150)
    fps = env.server.backend.bundle.fps
    print(f"\n<video> over 2 s: {second['presented'] - first['presented']} frames presented; prompt ack {ack}; "
          f"stall badge {badge!r} {shown_s:.1f} s after the kill; {stall}")
    assert (first["width"], first["height"]) == (256, 256)
    assert second["presented"] - first["presented"] >= 0.6 * 2 * fps and second["time"] - first["time"] > 1.2

    # The prompt: acknowledged at a frame, and from that frame on the pixels are the switched stream's.
    assert ack["of"] == "prompt" and ack["text"] == NEW_PROMPT and ack["frame"] > 0
    assert prompt_view["prompt"] == NEW_PROMPT
    n = ack["frame"] + 80
    old, new = SlotReference(PROMPT, n), SlotReference(PROMPT, n, switch=(ack["frame"], NEW_PROMPT))
    seen_before, seen_after = [identify(old, f) for f in before], [identify(new, f) for f in after]
    assert None not in seen_before and seen_before == sorted(seen_before) and max(seen_before) < ack["frame"], seen_before
    changed = [(f, i) for f, i in zip(after, seen_after) if i is not None and i >= ack["frame"]]
    assert len(changed) >= 10, seen_after
    moved = [old.toward(f, i, new) for f, i in changed]
    assert abs(np.mean(moved) - 1) < 0.25 and min(moved) > 0.5, moved

    # The stall: the badge names the replaced stage, the log has the frame, and the stream went on.
    assert re.fullmatch(r"stalled \d+\.\d s: stage0 replaced", badge), badge
    assert stall["type"] == "stall" and stall["replaced"] == ["stage0"] and stall["reason"]
    assert f"stream stalled {stall['recovery_s']:.1f} s before frame {stall['frame']}" in log_text, log_text
    assert stall_view["state"] == "streaming" and stall_view["stalls"] == 1 and stall_view["frame"] > stall["frame"]
    assert not [c for c in console if c.startswith("exception")], console
