"""The web client (`streamgen/serve/web`, served at `/`) in real headless Chromium against a real server.

Chromium is driven over the DevTools protocol with aiohttp's websocket client (spec ecosystem §5,
recipe B): no playwright, no node, no browser download — only Debian's `/usr/bin/chromium`
(`apt-get install -y chromium`; the tests skip without it). One server and one browser serve the
module; each test opens its own tab (fresh sessionStorage) and ends its own session.

Frames shown by the <video> are read back through a canvas, block-averaged to model size in the page,
and identified against frames computed here with the same deterministic model (test_serve.Reference),
so "the prompt changed the stream" is checked on the pixels, not just on the server's word.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from streamgen.serve.config import ServeConfig
from streamgen.serve.server import Server

from .test_serve import MATCH, Reference

CHROMIUM = Path(os.environ.get("STREAMGEN_CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found: headless Chromium is needed for the "
                                                               "web-client tests (apt-get install -y chromium)")

# Spec ecosystem §5: headless, no sandbox (containers), no GPU, nothing phoning home; WebRTC on loopback
# needs the loopback flag and real (not mDNS-hidden) host candidates. The background-* flags keep
# timers and video callbacks running at full rate in a tab nobody looks at.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
         "--autoplay-policy=no-user-gesture-required", "--disable-background-timer-throttling",
         "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows", "--window-size=1200,860",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
PROMPT, NEW_PROMPT = "a red fox", "a green field"


# --- DevTools protocol ------------------------------------------------------------------------------
class CDPError(Exception):
    pass


class Page:
    """One tab over its DevTools websocket: evaluate JS, type, screenshot; collects console errors."""

    def __init__(self, http: aiohttp.ClientSession, base: str, target: dict[str, Any]) -> None:
        self.http, self.base, self.target = http, base, target
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.console: list[str] = []  # page errors and console output, for failure messages
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def open(self) -> Page:
        self.ws = await self.http.ws_connect(self.target["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self._waiting.pop(data.get("id"), None)
            if future is not None and not future.done():
                if "error" in data:
                    future.set_exception(CDPError(data["error"].get("message", str(data["error"]))))
                else:
                    future.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.console.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in data["params"]["args"])
                self.console.append(f"console.{data['params']['type']}: {args}")
        for future in self._waiting.values():
            future.done() or future.set_exception(CDPError("DevTools connection closed"))

    async def call(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        future = self._waiting[msg_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await asyncio.wait_for(future, timeout)

    async def js(self, expression: str, timeout: float = 15.0) -> Any:
        """Evaluate in the page (promises awaited) and return the value as JSON data."""
        result = await self.call("Runtime.evaluate", timeout, expression=expression, awaitPromise=True,
                                 returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"{expression[:80]!r}: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, what: str = "") -> Any:
        end = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what or expression}\n{await self.diagnose()}")
            await asyncio.sleep(0.1)

    async def type_and_enter(self, selector: str, text: str) -> None:
        """Real keyboard input: focus, replace the value by typing, press Enter."""
        await self.js(f"(e => {{ e.focus(); e.select(); }})(document.querySelector({json.dumps(selector)}))")
        await self.call("Input.insertText", text=text)
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        await self.call("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        await self.call("Input.dispatchKeyEvent", type="keyUp", **key)

    async def screenshot(self, path: Path) -> Path:
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    async def log_text(self) -> str:
        return await self.js("document.getElementById('log').innerText")

    async def diagnose(self) -> str:
        with contextlib.suppress(Exception):
            state = await self.js("JSON.stringify({phase: streamgen.phase, session: streamgen.sessionId, "
                                  "presented: streamgen.presented, decoded: streamgen.decoded})", timeout=3)
            return f"page state {state}\nlog:\n{await self.log_text()}\nconsole: {self.console[-10:]}"
        return f"console: {self.console[-10:]}"

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        with contextlib.suppress(aiohttp.ClientError):
            async with self.http.get(f"{self.base}/json/close/{self.target['id']}"):
                pass


class Chromium:
    """Headless Debian Chromium with a fresh profile, its DevTools port read from DevToolsActivePort;
    `flags` are added to FLAGS (e.g. a fake microphone)."""

    def __init__(self, profile: Path, flags: tuple[str, ...] = ()) -> None:
        self.profile = profile
        self.flags = flags
        self.proc: asyncio.subprocess.Process | None = None
        self.base = ""
        self.http: aiohttp.ClientSession | None = None
        self._stderr = bytearray()  # the tail of chromium's own output, for a failed start
        self._drain: asyncio.Task | None = None

    async def start(self, timeout: float = 20.0) -> Chromium:
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM), *FLAGS, *self.flags, f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)  # its own process group: its helper processes end with it
        self._drain = asyncio.ensure_future(self._keep_stderr_tail())
        port_file, end = self.profile / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.returncode is not None or time.monotonic() > end:
                await asyncio.sleep(0.2)
                raise RuntimeError(f"chromium did not start (exit {self.proc.returncode}):\n"
                                   f"{self._stderr.decode(errors='replace')[-2000:]}")
            await asyncio.sleep(0.05)
        self.base = f"http://127.0.0.1:{port_file.read_text().split()[0]}"
        self.http = aiohttp.ClientSession()
        return self

    async def _keep_stderr_tail(self) -> None:
        while chunk := await self.proc.stderr.read(4096):
            self._stderr = (self._stderr + chunk)[-8192:]

    async def new_page(self, url: str) -> Page:
        async with self.http.put(f"{self.base}/json/new?{url}") as response:  # a new tab: fresh sessionStorage
            target = await response.json(content_type=None)
        page = Page(self.http, self.base, target)
        await page.open()
        await page.wait_for("document.readyState === 'complete' && window.streamgen !== undefined", 10, "the page to load")
        return page

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started (start_new_session)
                await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()


# --- the shared server and browser ------------------------------------------------------------------
class Env:
    """A server (tiny-random, local backend unless `config` says otherwise) and a browser (with `flags`) on an
    event loop in a background thread; `run` executes a coroutine there."""

    def __init__(self, tmp: Path, config: ServeConfig | None = None, flags: tuple[str, ...] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="browser-test-loop", daemon=True)
        self.thread.start()
        self.server = Server(config or ServeConfig(port=0, grace_s=5.0, model="tiny-random"))
        self.browser = Chromium(tmp / "profile", flags)
        self.run(self.server.start(), 180)  # a Ray backend starts its actors first
        try:
            self.run(self.browser.start())
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine, timeout: float = 45.0) -> Any:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop).result()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.browser.stop(), 15)
        with contextlib.suppress(Exception):
            self.run(self.server.stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    env = Env(tmp_path_factory.mktemp("browser"))
    yield env
    env.close()


def identify(ref: Reference, image: np.ndarray) -> int | None:
    """The reference frame index a captured (model-size) image shows, or None."""
    errors = ref.errors(image)
    best = int(np.argmin(errors))
    return best if errors[best] < MATCH else None


async def until(check: Callable[[], Any], seconds: float, step: float = 0.1) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        await asyncio.sleep(step)
    return bool(check())


async def connected_page(env: Env) -> Page:
    """A fresh tab on `/`, connected with PROMPT typed in, showing frames."""
    page = await env.browser.new_page(env.server.url + "/")
    await page.js(f"document.getElementById('prompt').value = {json.dumps(PROMPT)}")
    await page.js("document.getElementById('connect').click()")
    await page.wait_for("streamgen.phase === 'live'", 15, "the page to connect")
    await page.wait_for("document.getElementById('stream').videoWidth > 0", 10, "the first decoded frame")
    return page


async def video_progress(page: Page) -> dict[str, float]:
    return await page.js("""(() => { const v = document.getElementById('stream');
        return {width: v.videoWidth, height: v.videoHeight, time: v.currentTime, presented: streamgen.presented,
                total: v.getVideoPlaybackQuality().totalVideoFrames}; })()""")


# Shown frames, read back through a canvas at each requestVideoFrameCallback and block-averaged in the
# page to the model's size (so a few kB per frame cross the protocol, not 256 kB).
CAPTURE_JS = """(async (count, size) => {
  const video = document.getElementById('stream');
  const canvas = new OffscreenCanvas(video.videoWidth, video.videoHeight);
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  const frames = [];
  await new Promise((resolve) => {
    const grab = () => {
      const w = video.videoWidth, h = video.videoHeight, sy = h / size, sx = w / size;
      ctx.drawImage(video, 0, 0);
      const px = ctx.getImageData(0, 0, w, h).data, out = new Float32Array(size * size * 3);
      for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
        const i = 4 * (y * w + x), o = 3 * (Math.floor(y / sy) * size + Math.floor(x / sx));
        out[o] += px[i]; out[o + 1] += px[i + 1]; out[o + 2] += px[i + 2];
      }
      const block = sx * sy;
      frames.push(Array.from(out, (v) => Math.round(10 * v / block) / 10));
      if (frames.length >= count) resolve(); else video.requestVideoFrameCallback(grab);
    };
    video.requestVideoFrameCallback(grab);
  });
  return frames;
})"""


async def capture(page: Page, count: int, size: int) -> list[np.ndarray]:
    frames = await page.js(f"{CAPTURE_JS}({count}, {size})", timeout=count / 4 + 10)
    return [np.asarray(f, dtype=np.float32).reshape(size, size, 3) for f in frames]


# --- tests ------------------------------------------------------------------------------------------
def test_page_connects_and_the_video_plays(env: Env) -> None:
    async def main():
        page = await connected_page(env)
        try:
            html = await page.js("document.documentElement.outerHTML")
            first = await video_progress(page)
            await asyncio.sleep(2.0)
            second = await video_progress(page)
            quality_source = await page.js("streamgen.decoded")
            sid = await page.js("streamgen.sessionId")
            server_view = env.server.manager.get(sid).describe()
            await page.js("document.getElementById('disconnect').click()")
            await until(lambda: not env.server.manager.sessions, 5)
            return html, first, second, quality_source, server_view, page.console
        finally:
            await page.close()

    html, first, second, decoded, server_view, console = env.run(main())
    for needle in ('id="stream"', "autoplay", "playsinline", "muted", 'id="prompt"', 'id="stats"', 'id="log"',
                   'id="connect"', 'id="disconnect"', 'id="token"'):
        assert needle in html, needle
    assert (first["width"], first["height"]) == (256, 256)
    fps = env.server.backend.bundle.fps
    shown = second["presented"] - first["presented"]
    print(f"\n<video> over 2 s: {shown} frames presented, {second['total'] - first['total']} decoded, currentTime "
          f"+{second['time'] - first['time']:.2f} s; getStats {decoded['fps']:.1f} fps {decoded['codec']}; "
          f"server: first frame {server_view['first_frame_ms']} ms after the offer")
    assert second["time"] - first["time"] > 1.5
    assert second["total"] - first["total"] >= 0.75 * 2 * fps and shown >= 0.75 * 2 * fps  # ≈ 32 at 16 fps
    assert server_view["state"] == "streaming" and server_view["prompt"] == PROMPT
    assert not [c for c in console if c.startswith("exception")], console


def test_prompt_enter_is_acked_and_changes_the_stream(env: Env, tmp_path: Path) -> None:
    size = 32  # tiny-random frames are 32×32, shown at 256×256

    async def main():
        page = await connected_page(env)
        try:
            sid = await page.js("streamgen.sessionId")
            before = await capture(page, 12, size)
            await page.type_and_enter("#prompt", NEW_PROMPT)
            ack = (await page.wait_for("streamgen.acks.find(a => a.of === 'prompt')", 10, "the prompt's ack"))
            log_text = await page.log_text()
            after = await capture(page, 40, size)
            await page.wait_for("streamgen.stats && streamgen.stats.frame > 0", 5, "a stats message")
            stats_text = await page.js("document.getElementById('stats').innerText")
            shot = await page.screenshot(tmp_path / "page.png")
            server_view = env.server.manager.get(sid).describe()
            await page.js("document.getElementById('disconnect').click()")
            await until(lambda: not env.server.manager.sessions, 5)
            return ack, log_text, before, after, stats_text, shot, server_view
        finally:
            await page.close()

    ack, log_text, before, after, stats_text, shot, server_view = env.run(main())
    print(f"\nscreenshot: {shot}\nprompt ack {ack}\nstats overlay: {' '.join(stats_text.split())}")
    assert ack["of"] == "prompt" and ack["text"] == NEW_PROMPT and ack["frame"] > 0
    assert f"prompt “{NEW_PROMPT}” applied at frame {ack['frame']}" in log_text, log_text
    assert server_view["prompt"] == NEW_PROMPT
    assert "frame" in stats_text and "fps" in stats_text and "latency" in stats_text

    # Pixels: frames before the ack are the old prompt's, frames from the acked frame on the new one's.
    n = ack["frame"] + 80
    old, new = Reference(PROMPT, n), Reference(PROMPT, n, switch=(ack["frame"], NEW_PROMPT))
    seen_before = [identify(old, f) for f in before]
    seen_after = [identify(new, f) for f in after]
    print(f"frames before the change {seen_before}\nframes after {seen_after}")
    assert None not in seen_before and max(seen_before) < ack["frame"], seen_before
    assert seen_before == sorted(seen_before)
    changed = [(f, i) for f, i in zip(after, seen_after) if i is not None and i >= ack["frame"]]
    assert len(changed) >= 10, seen_after
    moved = [old.toward(f, i, new) for f, i in changed]
    print(f"frames after the ack moved {np.mean(moved):.2f} (min {np.min(moved):.2f}) of the way to the new prompt's")
    assert abs(np.mean(moved) - 1) < 0.25 and min(moved) > 0.5


def test_disconnect_frees_the_session(env: Env) -> None:
    async def main():
        page = await connected_page(env)
        try:
            sid = await page.js("streamgen.sessionId")
            assert env.server.backend.stats()["streams"] == 1 and sid in env.server.manager.sessions
            await page.js("document.getElementById('disconnect').click()")
            started = time.monotonic()
            freed = await until(lambda: not env.server.manager.sessions and env.server.backend.stats()["streams"] == 0, 5)
            took = time.monotonic() - started
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{env.server.url}/health") as r:
                    health = await r.json()
                async with http.get(f"{env.server.url}/sessions/{sid}") as r:
                    gone = r.status
            await page.wait_for("streamgen.phase === 'idle'", 3, "the page to go idle")
            page_state = await page.js("({stored: sessionStorage.getItem('streamgen.session'), "
                                       "connect: document.getElementById('connect').disabled, "
                                       "disconnect: document.getElementById('disconnect').disabled})")
            return freed, took, health, gone, page_state, await page.log_text()
        finally:
            await page.close()

    freed, took, health, gone, page_state, log_text = env.run(main())
    print(f"\nsession freed {took * 1000:.0f} ms after the click; /health {health}")
    assert freed, health
    assert sum(health["sessions"].values()) == 0 and health["streams"] == 0 and gone == 404
    assert page_state == {"stored": None, "connect": False, "disconnect": True}
    assert "closed" in log_text


def test_dropped_connection_resumes_the_same_session(env: Env) -> None:
    async def main():
        page = await connected_page(env)
        try:
            sid = await page.js("streamgen.sessionId")
            await asyncio.sleep(0.5)
            frame_before = env.server.manager.get(sid).describe()["frame"]
            resumed_before = env.server.metrics.value("streamgen_sessions_resumed_total")
            await page.js("streamgen.simulateDrop()")  # the peer connection closes; no DELETE reaches the server
            await page.wait_for("streamgen.phase === 'live'", 15, "the page to reconnect")
            presented = await page.js("streamgen.presented")
            await page.wait_for(f"streamgen.presented > {presented} + 8", 5, "frames after the reconnect")
            session = env.server.manager.get(sid)
            resumed_view = session.describe() if session else None
            count = len(env.server.manager.sessions)
            log_text = await page.log_text()
            await page.js("document.getElementById('disconnect').click()")
            await until(lambda: not env.server.manager.sessions, 5)
            resumes = env.server.metrics.value("streamgen_sessions_resumed_total") - resumed_before
            return sid, await page.js("streamgen.sessionId"), frame_before, resumes, resumed_view, count, log_text
        finally:
            await page.close()

    sid, sid_after_disconnect, frame_before, resumes, resumed, count, log_text = env.run(main())
    print(f"\nresumed session {sid[:8]}: frame {frame_before} before the drop, {resumed and resumed['frame']} after")
    assert resumed is not None and count == 1 and resumes == 1, log_text  # the same session, not a second one
    assert resumed["state"] == "streaming" and resumed["frame"] > frame_before  # the stream went on, not from 0
    assert f"resumed session {sid[:8]}" in log_text and "reconnecting to session" in log_text, log_text
    assert sid_after_disconnect is None


def test_token_field_is_sent_as_bearer_token(env: Env, tmp_path: Path) -> None:
    async def main():
        async with Server(ServeConfig(port=0, model="tiny-random", token="s3cret")) as guarded:
            page = await env.browser.new_page(guarded.url + "/")  # the page itself needs no token
            try:
                await page.js("document.getElementById('connect').click()")
                await page.wait_for("streamgen.phase === 'idle' && document.getElementById('log').innerText.includes('401')",
                                    10, "the 401 in the log")
                refused = await page.log_text()
                await page.js("(t => { t.value = 's3cret'; t.dispatchEvent(new Event('change')); })"
                              "(document.getElementById('token'))")
                await page.js("document.getElementById('connect').click()")
                await page.wait_for("streamgen.phase === 'live'", 15, "the page to connect with the token")
                await page.wait_for("streamgen.presented > 4", 10, "frames")
                await page.js("document.getElementById('disconnect').click()")
                freed = await until(lambda: not guarded.manager.sessions, 5)
                return refused, freed, await page.js("sessionStorage.getItem('streamgen.token')")
            finally:
                await page.close()

    refused, freed, stored = env.run(main())
    assert "server refused (401): missing or wrong bearer token" in refused, refused
    assert freed and stored == "s3cret"  # kept for this tab only (sessionStorage), for reconnects and reloads
