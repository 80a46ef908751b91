"""WHEP playback against a real server, with a plain aiortc player written to the draft (not streamgen's
client): POST an SDP offer → 201 + Location + the answer, watch the video, DELETE the location; and every
refusal the draft and the API promise (415, 400, 422, 404, 405, 503 + Retry-After)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from .test_serve import Reference, run, serving

SDP = "application/sdp"


class WhepPlayer:
    """A minimal WHEP player: one recvonly video transceiver, no data channel, no trickle."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.track: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pc.on("track", lambda track: self.track.done() or self.track.set_result(track))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())  # aiortc gathers every candidate here
        return self.pc.localDescription.sdp

    async def frames(self, n: int) -> list:
        track = await asyncio.wait_for(self.track, 30)
        return [await asyncio.wait_for(track.recv(), 30) for _ in range(n)]


async def post_whep(http: aiohttp.ClientSession, url: str, body: bytes, content_type: str = SDP,
                    query: str = "") -> tuple[int, dict[str, str], str]:
    async with http.post(f"{url}/whep{query}", data=body, headers={"Content-Type": content_type}) as r:
        return r.status, dict(r.headers), await r.text()


def test_a_whep_player_watches_a_session_and_deletes_it() -> None:
    async def main():
        async with serving() as server, aiohttp.ClientSession() as http:
            async with http.head(f"{server.url}/whep") as r:
                discovery = (r.status, r.headers.get("Content-Type"))
            player = WhepPlayer()
            status, headers, answer = await post_whep(http, server.url, (await player.offer()).encode(),
                                                      query="?prompt=a%20red%20fox&seed=3")
            await player.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            frames = await player.frames(24)
            location = headers["Location"]
            sid = location.rsplit("/", 1)[1]
            view = server.manager.get(sid).describe()
            async with http.patch(server.url + location, data=b"a=candidate:1", headers={"Content-Type":
                                  "application/trickle-ice-sdpfrag"}) as r:
                patched = (r.status, r.headers.get("Allow"))
            async with http.delete(server.url + location) as r:
                deleted = r.status
            gone = server.manager.get(sid) is None
            async with http.delete(server.url + location) as r:
                deleted_again = r.status
            await player.pc.close()
        return discovery, status, headers, answer, frames, view, patched, deleted, gone, deleted_again

    discovery, status, headers, answer, frames, view, patched, deleted, gone, deleted_again = run(main())
    assert discovery == (200, SDP)
    assert status == 201 and headers["Content-Type"].startswith(SDP) and headers["Location"].startswith("/whep/")
    assert answer.startswith("v=0") and "a=sendonly" in answer
    assert view["prompt"] == "a red fox" and view["state"] == "streaming"
    # The player sees the model's frames of that prompt and seed, in order.
    ref = Reference("a red fox", 120, seed=3)
    seen = [ref.identify(SimpleNamespace(image=f.to_ndarray(format="rgb24"))) for f in frames]
    assert None not in seen and seen == sorted(seen) and seen[-1] > seen[0], seen
    assert [f.pts for f in frames] == sorted(f.pts for f in frames)
    assert patched == (405, "DELETE")
    assert deleted == 200 and gone and deleted_again == 404


def test_whep_refusals_name_the_problem() -> None:
    async def main():
        async with serving(max_sessions=1) as server, aiohttp.ClientSession() as http:
            offer = (await WhepPlayer().offer()).encode()
            wrong_type = await post_whep(http, server.url, offer, content_type="application/json")
            malformed = await post_whep(http, server.url, b"hello")
            binary = await post_whep(http, server.url, b"\xff\xfe v=0")
            bad_seed = await post_whep(http, server.url, offer, query="?seed=-1")
            unknown_param = await post_whep(http, server.url, offer, query="?colour=blue")
            async with http.delete(f"{server.url}/whep/nosuchsession") as r:
                unknown = (r.status, await r.json())
            first = WhepPlayer()
            opened = await post_whep(http, server.url, (await first.offer()).encode())
            full = await post_whep(http, server.url, offer)
            health = server.manager.counts()
            async with http.delete(server.url + opened[1]["Location"]) as r:
                assert r.status == 200
            await first.pc.close()
        return wrong_type, malformed, binary, bad_seed, unknown_param, unknown, opened, full, health

    wrong_type, malformed, binary, bad_seed, unknown_param, unknown, opened, full, health = run(main())
    assert wrong_type[0] == 415 and wrong_type[1]["Accept-Post"] == SDP and "application/json" in wrong_type[2]
    assert malformed[0] == 400 and "malformed SDP" in malformed[2]
    assert binary[0] == 400 and "not UTF-8" in binary[2]
    assert bad_seed[0] == 422 and "seed" in bad_seed[2]
    assert unknown_param[0] == 422 and "colour" in unknown_param[2]
    assert unknown[0] == 404 and "nosuchsession" in unknown[1]["error"]
    assert opened[0] == 201
    assert full[0] == 503 and full[1]["Retry-After"] == "5", full
    assert health.get("streaming", 0) + health.get("connecting", 0) <= 1
    assert np.isfinite(len(full[2]))  # a reason was given
