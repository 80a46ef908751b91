"""Live video-to-video: the V2V stream mode of the embedded model in process (determinism, the input
actually steering the output, the live input buffer), and WHIP ingest against a real server with a real
aiortc client that sends a generated camera (a coloured square moving along one band of the picture) on a
sendrecv video section and receives the generated video back on it; and every WHIP refusal."""
from __future__ import annotations

import asyncio
import fractions
import json

import aiohttp
import av
import numpy as np
import pytest
import torch
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from streamgen.bundles.bundle import load_bundle
from streamgen.bundles.frame_encoders import frame_encoder
from streamgen.engine.frame_stream import FrameStream
from streamgen.engine.v2v import FrameList, LiveFrames, use_video, v2v_steps
from streamgen.errors import InputError

from .test_serve import run, serving

SDP = "application/sdp"
PROMPT = "a red square moving right"
RED = (255, 0, 0)


# --- inputs ------------------------------------------------------------------------------------------------
TOP, LOW = 4, 16  # the square's first row (of 32): rows 4–15 or 16–27, on the world's 4-px token grid


def square_frame(i: int, colour: tuple[int, int, int], top: int, size: int = 32) -> np.ndarray:
    """A world-like frame (black) with a 12/32-wide square moving right (1/16 of the width per frame,
    wrapping) whose rows start at `top` (in 32ths of the height)."""
    side, first = size * 3 // 8, top * size // 32
    image = np.zeros((size, size, 3), np.uint8)
    cols = (np.arange(side) + i * max(1, size // 16)) % size
    image[first:first + side, cols] = colour
    return image


def square_frames(n: int, colour: tuple[int, int, int], top: int) -> np.ndarray:
    return np.stack([square_frame(i, colour, top) for i in range(n)])


def red_mass(frames: np.ndarray) -> np.ndarray:
    """Red-dominance (R above max(G, B)) per pixel, [N, H, W]."""
    f = frames.astype(np.float32)
    return (f[..., 0] - f[..., 1:].max(axis=-1)).clip(0)


def red_row(frames: np.ndarray) -> float:
    """The mean row of the frames' red-dominant mass (the square's centre row when it follows the input)."""
    rows = red_mass(frames).sum(axis=(0, 2))
    return float((rows * np.arange(len(rows))).sum() / max(rows.sum(), 1e-6))


def red_share(frames: np.ndarray, top: int) -> float:
    """The share of the red-dominant mass in the rows of a square starting at `top`, ± one token (4 rows)."""
    rows = red_mass(frames).sum(axis=(0, 2))
    return float(rows[max(0, top - 4):top + 12 + 4].sum() / max(rows.sum(), 1e-6))


# --- the V2V stream, in process ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the test servers run it: far faster than 2 threads on a busy 2-core box
    try:
        yield load_bundle("embedded")
    finally:
        torch.set_num_threads(threads)


def v2v_chunks(bundle, frames: np.ndarray | None, strength: float = 0.75, seed: int = 0, chunks: int = 4,
               prompt: str = PROMPT) -> tuple[torch.Tensor, np.ndarray]:
    """(latents [1, F, 3, 32, 32], frames uint8 [F, 32, 32, 3]) of a stream fed `frames` (None: text-to-video)."""
    stream = FrameStream(bundle, prompt, {"seed": seed})
    if frames is not None:
        use_video(stream.stream, FrameList(frames), frame_encoder(bundle), strength)
    out = [stream.next() for _ in range(chunks)]
    return torch.cat([c.latents for c in out], dim=1), np.concatenate([c.frames.numpy() for c in out])


def test_v2v_steps_start_at_the_input_strength() -> None:
    assert v2v_steps([1000, 750, 500, 250], 0.75) == [750, 500, 250]
    assert v2v_steps([1000, 750, 500, 250], 0.6) == [600, 500, 250]
    assert v2v_steps([1000, 750, 500, 250], 0.8, offset=100) == [700, 500, 250]  # StreamDiffusionV2's t0 = 1000·s − 100
    assert v2v_steps([1000, 750, 500, 250], 1.0) == [1000, 750, 500, 250]
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="strength"):
            v2v_steps([1000, 750], bad)


def test_v2v_is_deterministic_and_follows_its_input(bundle) -> None:
    top, low = square_frames(12, RED, TOP), square_frames(12, RED, LOW)
    a, frames_a = v2v_chunks(bundle, top)
    again, _ = v2v_chunks(bundle, top)
    b, frames_b = v2v_chunks(bundle, low)
    other_seed, _ = v2v_chunks(bundle, top, seed=1)
    assert torch.equal(a, again)  # same seed + same input frames → the same latents, bit for bit
    assert not torch.allclose(a, b, atol=0.1)  # another input → other latents
    assert not torch.equal(a, other_seed)
    # The picture follows the input: a red square where the input's red square is, and it moves with it.
    assert red_share(frames_a, TOP) > 0.8 and red_share(frames_b, LOW) > 0.8, (red_share(frames_a, TOP), red_share(frames_b, LOW))
    assert red_row(frames_b) - red_row(frames_a) > 8, (red_row(frames_a), red_row(frames_b))
    # Strength 1 ignores the input: it is text-to-video of the same seed, bit for bit (same sampler, same noise).
    t2v, _ = v2v_chunks(bundle, None)
    at_one, _ = v2v_chunks(bundle, top, strength=1.0)
    assert torch.equal(t2v, at_one)
    assert not torch.allclose(t2v, a, atol=0.1)


def test_a_reset_replays_the_same_v2v_stream(bundle) -> None:
    stream = FrameStream(bundle, PROMPT, {"seed": 4})
    execution = use_video(stream.stream, FrameList(square_frames(9, RED, TOP)), frame_encoder(bundle), 0.6)
    assert execution.sampler.timesteps == [600, 500, 250]
    first = [stream.next().latents for _ in range(2)]
    stream.reset()
    again = [stream.next().latents for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    stream.set_params(steps=[1000, 500])  # a new step list is cut at the input's level too
    stream.next()
    assert stream.stream.execution.sampler.timesteps == [600, 500]
    with pytest.raises(InputError, match="before a stream's first chunk"):
        use_video(stream.stream, FrameList(square_frames(3, RED, TOP)), frame_encoder(bundle))


def test_models_without_a_frame_encoder_are_refused() -> None:
    with pytest.raises(InputError, match="takes no video input"):
        frame_encoder(load_bundle("tiny-random"))


def test_live_frames_never_wait() -> None:
    live = LiveFrames(2, 2, capacity=8)
    frame = [np.full((2, 2, 3), v, np.uint8) for v in range(20)]
    assert not live.started and (live.take(0, 3) == 0).all()  # nothing yet: black fill frames
    for f in frame[1:12]:  # 11 arrived (3 pushed out by the capacity of 8), the model wants 3
        live.push(f)
    assert [int(x[0, 0, 0]) for x in live.take(1, 3)] == [5, 8, 11]  # uniform over the backlog (4…11), ending at the newest
    live.push(frame[12])
    assert [int(x[0, 0, 0]) for x in live.take(2, 3)] == [12, 12, 12]  # the camera is slower: the last one repeated
    assert [int(x[0, 0, 0]) for x in live.take(3, 3)] == [12, 12, 12]
    assert live.counts == {"received": 12, "used": 4, "skipped": 3 + 5, "repeated": 2 + 3, "filled": 3}
    with pytest.raises(ValueError):
        live.push(np.zeros((4, 4, 3), np.uint8))


def test_camera_frames_are_fitted_to_the_model(bundle) -> None:
    encoder = frame_encoder(bundle)
    wide = np.zeros((48, 64, 3), np.uint8)
    wide[:, 8:56] = RED  # the centred 48×48 crop is all red; the bars left and right are cropped away
    fitted = encoder.fit(av.VideoFrame.from_ndarray(wide, format="rgb24"))
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.uint8
    assert (fitted[..., 0] > 200).all() and (fitted[..., 1:] < 60).all()
    latents = encoder.encode(fitted[None])
    assert latents.shape == (1, 1, 3, 32, 32) and float(latents.max()) <= 1 and float(latents.min()) >= -1


# --- WHIP, against a real server -------------------------------------------------------------------------------
class SquareCamera(VideoStreamTrack):
    """A camera: 64×64 frames at 30 fps of a square moving right (a step every 4 frames), its rows from `top`/32."""

    def __init__(self, colour: tuple[int, int, int], top: int) -> None:
        super().__init__()
        self.colour, self.top, self.count = colour, top, 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(square_frame(self.count // 4, self.colour, self.top, size=64), format="rgb24")
        frame.pts, frame.time_base = pts, fractions.Fraction(time_base)
        self.count += 1
        return frame


class CameraPeer:
    """A client that sends its camera on a sendrecv video section and watches what comes back on it."""

    def __init__(self, camera: VideoStreamTrack | None, direction: str = "sendrecv", control: bool = False,
                 videos: int = 1) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        for _ in range(videos):
            self.pc.addTransceiver(camera if camera is not None else "video", direction=direction)
        if control:
            self.pc.createDataChannel("control")
        self.track: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pc.on("track", lambda track: self.track.done() or self.track.set_result(track))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answered(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def frames(self, n: int, skip: int = 0) -> np.ndarray:
        """n received frames after skipping `skip`, block-averaged back to 32×32."""
        track = await asyncio.wait_for(self.track, 30)
        out = []
        for i in range(skip + n):
            image = (await asyncio.wait_for(track.recv(), 30)).to_ndarray(format="rgb24")
            if i >= skip:
                s = image.shape[0] // 32
                out.append(image.reshape(32, s, 32, s, 3).mean(axis=(1, 3)))
        return np.stack(out)


async def post_whip(http: aiohttp.ClientSession, url: str, body: bytes, content_type: str = SDP,
                    query: str = "") -> tuple[int, dict[str, str], str]:
    async with http.post(f"{url}/whip{query}", data=body, headers={"Content-Type": content_type}) as r:
        return r.status, dict(r.headers), await r.text()


def test_a_camera_sent_over_whip_steers_the_video_it_gets_back() -> None:
    """Two clients at once, the same prompt and seed: one over WHIP with a red square high in its camera, one
    over POST /offer (JSON, with `video`) with it low. Each gets the generated video back on its own
    connection, and the red square in it stands where its own camera's square is."""

    async def main():
        async with serving(model="embedded") as server, aiohttp.ClientSession() as http:
            top = CameraPeer(SquareCamera(RED, TOP))
            status, headers, answer = await post_whip(http, server.url, (await top.offer()).encode(),
                                                      query=f"?prompt={PROMPT.replace(' ', '%20')}&strength=0.75&seed=3")
            assert status == 201, answer
            await top.answered(answer)
            bottom = CameraPeer(SquareCamera(RED, LOW), control=True)
            async with http.post(f"{server.url}/offer", json={"sdp": await bottom.offer(), "type": "offer", "prompt": PROMPT,
                                                              "params": {"seed": 3}, "video": {"strength": 0.75}}) as r:
                body = await r.json()
                assert r.status == 200, body
            await bottom.answered(body["sdp"])
            seen_top, seen_bottom = await asyncio.gather(top.frames(16, skip=8), bottom.frames(16, skip=8))
            sid = headers["Location"].rsplit("/", 1)[1]
            views = server.manager.get(sid).describe(), server.manager.get(body["session_id"]).describe()
            async with http.delete(server.url + headers["Location"]) as r:
                deleted = r.status
            gone = server.manager.get(sid) is None
            await top.pc.close()
            await bottom.pc.close()
        return headers, answer, seen_top, seen_bottom, views, deleted, gone

    headers, answer, seen_top, seen_bottom, views, deleted, gone = run(main(), timeout=90)
    assert headers["Content-Type"].startswith(SDP) and headers["Location"].startswith("/whip/")
    assert answer.startswith("v=0") and "a=sendrecv" in answer  # the camera in, the generated video back
    for view in views:
        video = view["video_input"]
        assert video["strength"] == 0.75 and video["started"] and video["received"] > 0 and video["used"] > 0, video
        assert view["frames"]["sent"] > 0
    # Where each camera's red square is (codec and frame sampling blur it a little), and apart from each other.
    assert red_share(seen_top, TOP) > 0.75 and red_share(seen_bottom, LOW) > 0.75, (red_share(seen_top, TOP),
                                                                                  red_share(seen_bottom, LOW))
    assert red_row(seen_bottom) - red_row(seen_top) > 8, (red_row(seen_top), red_row(seen_bottom))
    assert deleted == 200 and gone


def test_a_camera_that_sends_nothing_does_not_stall_the_session() -> None:
    """No frame ever arrives (a sendrecv section without a track): the first chunk waits for the camera at
    most until the connect timeout, then the stream goes on from black frames; nothing blocks."""

    async def main():
        async with serving(model="embedded", connect_timeout_s=3.0) as server, aiohttp.ClientSession() as http:
            silent = CameraPeer(None)
            status, headers, answer = await post_whip(http, server.url, (await silent.offer()).encode(),
                                                      query="?prompt=a%20blue%20circle")
            await silent.answered(answer)
            frames = await silent.frames(4)
            view = server.manager.get(headers["Location"].rsplit("/", 1)[1]).describe()
            await silent.pc.close()
        return status, frames, view

    status, frames, view = run(main())
    assert status == 201 and len(frames) == 4
    assert not view["video_input"]["started"] and view["video_input"]["filled"] > 0, view["video_input"]


def test_whip_refusals_name_the_problem() -> None:
    async def main():
        async with serving(model="embedded", max_sessions=1) as server, aiohttp.ClientSession() as http:
            offer = (await CameraPeer(SquareCamera(RED, TOP)).offer()).encode()
            async with http.options(f"{server.url}/whip") as r:
                options = (r.status, r.headers.get("Accept-Post"))
            wrong_type = await post_whip(http, server.url, offer, content_type="application/json")
            malformed = await post_whip(http, server.url, b"hello")
            binary = await post_whip(http, server.url, b"\xff\xfe v=0")
            recvonly = await post_whip(http, server.url, (await CameraPeer(None, "recvonly").offer()).encode())
            two_videos = await post_whip(http, server.url, (await CameraPeer(None, videos=2).offer()).encode())
            strong = await post_whip(http, server.url, offer, query="?strength=2")
            wordy = await post_whip(http, server.url, offer, query="?strength=high")
            unknown_param = await post_whip(http, server.url, offer, query="?colour=blue")
            async with http.post(f"{server.url}/offer", json={"sdp": (await CameraPeer(None, "recvonly", control=True).offer()),
                                                              "type": "offer", "video": {}}) as r:
                offer_recvonly = (r.status, await r.json())
            async with http.delete(f"{server.url}/whip/nosuchsession") as r:
                unknown = (r.status, await r.json())
            first = CameraPeer(SquareCamera(RED, TOP))
            opened = await post_whip(http, server.url, (await first.offer()).encode())
            async with http.patch(server.url + opened[1]["Location"], data=b"a=candidate:1",
                                  headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as r:
                patched = (r.status, r.headers.get("Allow"))
            full = await post_whip(http, server.url, offer)
            async with http.delete(server.url + opened[1]["Location"]) as r:
                closed = r.status
            await first.pc.close()
        async with serving() as server, aiohttp.ClientSession() as http:  # tiny-random: latents that are not pixels
            no_encoder = await post_whip(http, server.url, offer)
            no_encoder_streams = server.backend.stats()["streams"]
        return (options, wrong_type, malformed, binary, recvonly, two_videos, strong, wordy, unknown_param,
                offer_recvonly, unknown, opened, patched, full, closed, no_encoder, no_encoder_streams)

    (options, wrong_type, malformed, binary, recvonly, two_videos, strong, wordy, unknown_param, offer_recvonly,
     unknown, opened, patched, full, closed, no_encoder, no_encoder_streams) = run(main(), timeout=90)
    assert options == (204, SDP)
    assert wrong_type[0] == 415 and wrong_type[1]["Accept-Post"] == SDP and "application/json" in wrong_type[2]
    assert malformed[0] == 400 and "malformed SDP" in malformed[2]
    assert binary[0] == 400 and "not UTF-8" in binary[2]
    assert recvonly[0] == 400 and "recvonly" in recvonly[2] and "sendrecv" in recvonly[2], recvonly
    assert two_videos[0] == 400 and "2 video sections" in two_videos[2], two_videos
    assert strong[0] == 422 and "strength" in strong[2], strong
    assert wordy[0] == 422 and "strength" in wordy[2], wordy
    assert unknown_param[0] == 422 and "colour" in unknown_param[2]
    assert offer_recvonly[0] == 400 and "sendrecv" in offer_recvonly[1]["error"], offer_recvonly
    assert unknown[0] == 404 and "nosuchsession" in unknown[1]["error"]
    assert opened[0] == 201, opened
    assert patched == (405, "DELETE")
    assert full[0] == 503 and full[1]["Retry-After"] == "5" and json.loads(full[2])["error"], full
    assert closed == 200
    assert no_encoder[0] == 400 and "takes no video input" in no_encoder[2], no_encoder
    assert no_encoder_streams == 0  # refused before a stream was opened
