"""`streamgen bench serve --offer-flood`: what an offer flood from one address costs a healthy viewer.

One in-process server per setting (the per-address offer limit on, then off); a healthy viewer (a
`streamgen client` subprocess) streams throughout; a flooder subprocess opens and deletes sessions as
fast as the server answers. The healthy session's new frames per second (server-side counts: frames
sent that were new, not held) before and during the flood, side by side for both settings."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

FLOODER = r"""
import asyncio, json, sys, time
import aiohttp
from aiortc import RTCPeerConnection

async def main(url, seconds):
    pc = RTCPeerConnection(); pc.createDataChannel("control"); pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer()); sdp = pc.localDescription.sdp; await pc.close()
    body = json.dumps({"sdp": sdp, "type": "offer", "prompt": "a flood"})
    counts, end = {}, time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < end:
            async with http.post(url + "/offer", data=body, headers={"Content-Type": "application/json"}) as r:
                reply = await r.json(content_type=None)
                counts[r.status] = counts.get(r.status, 0) + 1
            if r.status == 200:
                async with http.delete(url + "/sessions/" + reply["session_id"]) as d:
                    await d.read()
    print(json.dumps(counts), flush=True)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


async def _new_frames(server, sid: str) -> int:
    session = server.manager.get(sid)
    return session.describe()["frames"].get("sent", 0) if session is not None else 0


async def _window(server, sid: str, seconds: float) -> float:
    """New frames per second the healthy session was sent over the next `seconds`."""
    before, start = await _new_frames(server, sid), time.monotonic()
    await asyncio.sleep(seconds)
    return (await _new_frames(server, sid) - before) / (time.monotonic() - start)


async def _one(args: argparse.Namespace, offer_rate: float) -> dict[str, Any]:
    from ..serve.config import ServeConfig
    from ..serve.server import Server

    config = ServeConfig(port=0, model=args.model or ServeConfig.model, threads=args.threads, offer_rate=offer_rate,
                         max_sessions=4, max_sessions_per_ip=4, grace_s=1.0)
    async with Server(config) as server:
        viewer = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamgen.cli", "client", server.url, "--prompt", "a red circle moving right",
            "--seconds", str(3 * args.seconds + 30), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not server.manager.sessions:
                if time.monotonic() > deadline:
                    raise RuntimeError("the healthy viewer never connected")
                await asyncio.sleep(0.1)
            sid = next(iter(server.manager.sessions))
            await _window(server, sid, 2.0)  # warm: the first chunks, the encoder settling
            quiet = await _window(server, sid, args.seconds)
            flooder = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLOODER, server.url, str(args.seconds + 1), stdout=asyncio.subprocess.PIPE)
            await asyncio.sleep(0.5)
            flooded = await _window(server, sid, args.seconds)
            counts = json.loads((await flooder.communicate())[0] or b"{}")
        finally:
            viewer.kill()
            await viewer.wait()
    return {"offer_rate": offer_rate, "new_fps_quiet": quiet, "new_fps_flooded": flooded, "fps": server.backend.bundle.fps,
            "kept": flooded / quiet if quiet else None, "flood_replies": counts}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    limited = await _one(args, args.offer_rate)
    unlimited = await _one(args, 1e9)
    return {"benchmark": "serve-offer-flood", "seconds": args.seconds, "model": args.model,
            "runs": {"limited": limited, "unlimited": unlimited}}


def render(result: dict[str, Any]) -> str:
    lines = [f"bench serve --offer-flood: one healthy viewer, a flood of create/delete cycles from one address, "
             f"{result['seconds']:g} s windows"]
    for name, r in result["runs"].items():
        rate = "no limit" if r["offer_rate"] >= 1e9 else f"--offer-rate {r['offer_rate']:g}"
        replies = ", ".join(f"{k}: {v}" for k, v in sorted(r["flood_replies"].items()))
        lines.append(f"  {name:<10} ({rate}): new fps {r['new_fps_quiet']:.2f} → {r['new_fps_flooded']:.2f} during the "
                     f"flood ({100 * (r['kept'] or 0):.0f} % kept; nominal {r['fps']:g}); flood replies {replies}")
    return "\n".join(lines)
