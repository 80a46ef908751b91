"""The web page tells the user what happened, in real headless Chromium against a real server running the
embedded model (a closed vocabulary): how a prompt was understood and which words were ignored, which words
the model knows, button and stats states, one log line per burst, the 401 pointing at the settings.

Screenshots of each state land in the test's tmp dir (printed) for a human look; the assertions read the
page's DOM and its `window.streamgen` view.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from streamgen.serve import limits
from streamgen.serve.config import ServeConfig
from streamgen.serve.server import Server

from .test_browser import Env, Page, pytestmark, until  # noqa: F401  (pytestmark: skipped without Chromium)

KNOWN = "a red square moving left"
UNKNOWN = "a purple gizmo dancing wildly"
LOG_ITEMS_JS = "[...document.querySelectorAll('#log li')].map(li => ({kind: li.className, text: li.querySelector('span').textContent}))"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    env = Env(tmp_path_factory.mktemp("page-states"), ServeConfig(port=0, grace_s=5.0, model="embedded"))
    yield env
    env.close()


async def live_page(env: Env, prompt: str = KNOWN) -> Page:
    page = await env.browser.new_page(env.server.url + "/")
    await page.js(f"document.getElementById('prompt').value = {json.dumps(prompt)}")
    await page.js("document.getElementById('connect').click()")
    await page.wait_for("streamgen.phase === 'live'", 15, "the page to connect")
    return page


async def log_items(page: Page) -> list[dict[str, str]]:
    return await page.js(LOG_ITEMS_JS)


async def end(env: Env, page: Page) -> None:
    await page.js("document.getElementById('disconnect').click()")
    await until(lambda: not env.server.manager.sessions, 5)
    await page.close()


def test_the_page_names_the_known_words_and_warns_about_ignored_ones(env: Env, tmp_path: Path) -> None:
    async def main():
        page = await env.browser.new_page(env.server.url + "/")
        try:
            await page.wait_for("!document.getElementById('vocabulary').hidden", 10, "the vocabulary hint")
            hint = await page.js("document.getElementById('vocabulary').textContent")
            placeholder = await page.js("document.getElementById('prompt').placeholder")
            await page.screenshot(tmp_path / "idle-with-vocabulary.png")
            await page.js(f"document.getElementById('prompt').value = {json.dumps(KNOWN)}")
            await page.js("document.getElementById('connect').click()")
            phase = await page.js("streamgen.phase")
            await page.type_and_enter("#prompt", UNKNOWN)  # typed while connecting: sent once the channel opens
            await page.wait_for("streamgen.acks.some(a => a.of === 'prompt')", 15, "the prompt's ack")
            await page.wait_for("document.getElementById('log').innerText.includes('active prompt')", 15, "the active prompt")
            ack = next(a for a in await page.js("streamgen.acks") if a["of"] == "prompt")
            long_prompt = "a blue circle moving up " + "very " * 95
            await page.type_and_enter("#prompt", long_prompt)
            await page.wait_for("streamgen.acks.filter(a => a.of === 'prompt').length === 2", 15, "the second ack")
            await page.screenshot(tmp_path / "prompt-warnings.png")
            items = await log_items(page)
        finally:
            await end(env, page)
        return hint, placeholder, phase, ack, long_prompt, items

    hint, placeholder, phase, ack, long_prompt, items = env.run(main())
    assert phase == "connecting"
    assert not [i for i in items if "not sent" in i["text"]], items
    print(f"\nscreenshots in {tmp_path}")
    assert hint == ("embedded knows only these words — colour: red, green, blue, yellow, white, cyan, magenta; "
                    "shape: circle, square, triangle; direction: left, right, up, down. Other words are ignored.")
    assert placeholder == "e.g. a red square moving left, press Enter"
    active = [i for i in items if i["text"].startswith("✓ active prompt")]
    assert active == [{"kind": "ack", "text": f"✓ active prompt “{KNOWN}”"}], items
    warned = [i for i in items if "gizmo" in i["text"]]
    assert len(warned) == 1 and warned[0]["kind"] == "warn", items  # a warning, not a ✓
    assert warned[0]["text"].startswith(f"⚠ prompt “{UNKNOWN}” applied at frame {ack['frame']} ("), warned
    assert warned[0]["text"].endswith("as “a white circle moving right”: the model does not know “purple”, “gizmo”, "
                                      "“dancing”, “wildly” (ignored); colour, shape, direction left at the default")
    long_line = next(i["text"] for i in items if "very" in i["text"])
    assert long_prompt not in long_line and "“a blue circle moving up very" in long_line
    assert len(long_line.split("”")[0]) <= 80 + 2 + len("⚠ prompt ")  # quoted prompts are cut to 80 characters


def test_buttons_stats_and_log_bursts_stay_truthful(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main():
        page = await env.browser.new_page(env.server.url + "/")
        try:
            # Watch the buttons from before Connect: Pause and Resume must never be enabled together.
            await page.js("""window.__both = 0; setInterval(() => {
                const p = document.getElementById('pause'), r = document.getElementById('resume');
                if (!p.disabled && !r.disabled) window.__both += 1; }, 10)""")
            await page.js(f"document.getElementById('prompt').value = {json.dumps(KNOWN)}")
            await page.js("document.getElementById('connect').click()")
            await page.wait_for("streamgen.phase === 'live'", 15, "the page to connect")
            await page.wait_for("streamgen.stats !== null", 10, "the first stats message")
            both = await page.js("window.__both")
            # A burst past the rate limit: one log line counting the refusals, not one line each. The
            # bucket's clock stands still during the burst, so the refusals come as one run after the acks.
            frozen = time.monotonic()
            monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: frozen))
            acks_before = await page.js("streamgen.acks.length")
            await page.js("for (let k = 0; k < 40; k++) streamgen.send({type: 'resume'})")
            await page.wait_for(f"streamgen.acks.length - {acks_before} + streamgen.errors.length >= 40", 15,
                                "replies to the burst")
            monkeypatch.undo()
            refused = await page.js("streamgen.errors.filter(e => /rate limit/.test(e.message)).length")
            burst_items = [i for i in await log_items(page) if "rate limit" in i["text"]]
            # A drop: the stats line goes blank while reconnecting, instead of showing the dead stream's numbers.
            await page.js("streamgen.simulateDrop()")
            during_drop = await page.js("({phase: streamgen.phase, hidden: document.getElementById('stats').hidden, "
                                        "frame: document.querySelector('[data-stat=frame]').textContent})")
            await page.screenshot(tmp_path / "reconnecting.png")
            await page.wait_for("streamgen.phase === 'live'", 15, "the page to reconnect")
            # Disconnect with a control still unanswered: no spurious "no reply" (the user asked to leave).
            await page.js("streamgen.send({type: 'prompt', prompt: 'a blue circle'}); "
                          "document.getElementById('disconnect').click()")
            await page.wait_for("streamgen.phase === 'idle'", 5, "the page to go idle")
            no_reply = [i for i in await log_items(page) if "no reply" in i["text"]]
            await until(lambda: not env.server.manager.sessions, 5)
        finally:
            await page.close()
        return both, refused, burst_items, during_drop, no_reply

    both, refused, burst_items, during_drop, no_reply = env.run(main())
    assert both == 0
    assert refused == 40 - 20 and len(burst_items) == 1, burst_items  # bursts of 20 fit, 20 refused
    assert burst_items[0]["kind"] == "error" and burst_items[0]["text"].endswith(f" ×{refused}"), burst_items
    assert during_drop == {"phase": "reconnecting", "hidden": True, "frame": "–"}, during_drop
    assert no_reply == []


def test_a_401_points_at_the_connection_settings(env: Env) -> None:
    async def main():
        async with Server(ServeConfig(port=0, model="embedded", token="s3cret")) as guarded:
            page = await env.browser.new_page(guarded.url + "/")
            try:
                assert await page.js("document.getElementById('settings').open") is False
                await page.js("document.getElementById('connect').click()")
                await page.wait_for("streamgen.phase === 'idle' && document.getElementById('log').innerText.includes('401')",
                                    10, "the 401 in the log")
                items = await log_items(page)
                opened = await page.js("document.getElementById('settings').open")
                async with aiohttp.ClientSession() as http:  # /model needs the token too: no hint without it
                    async with http.get(f"{guarded.url}/model") as r:
                        status = r.status
                hint_hidden = await page.js("document.getElementById('vocabulary').hidden")
            finally:
                await page.close()
        return items, opened, status, hint_hidden

    items, opened, status, hint_hidden = env.run(main())
    assert opened is True and status == 401 and hint_hidden is True
    assert {"kind": "info", "text": "this server needs an access token: enter it under Connection settings, then Connect"} in items
