"""`StreamClient`: one live stream from a streamgen server, as numpy frames plus the control channel.

    async with StreamClient("http://127.0.0.1:8080", prompt="a red fox") as client:
        frame = await client.next_frame()             # ReceivedFrame: image uint8 [H, W, 3], pts, time
        ack = await client.send_prompt("the fox jumps")  # {"type": "ack", "of": "prompt", "frame": ...}

    # an avatar model: the speech drives the face, and comes back as audio beside the video
    async with StreamClient(url, audio="speech.wav", reference="face.png", record="talk.mp4") as client: ...

Standalone (aiortc, aiohttp, av, numpy): it speaks only the HTTP + data-channel protocol.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aioice.ice
import numpy as np
from aiortc import (MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpReceiver,
                    RTCSessionDescription)
from aiortc.mediastreams import MediaStreamError

from .media import MonoConverter, SpeechTrack, load_speech, reference_data_url
from .recorder import Recorder


@dataclass(frozen=True)
class ReceivedFrame:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    pts: int  # RTP clock (90 kHz) since this connection's first frame
    time: float  # time.monotonic() on arrival
    seq: int  # frames received on this client so far (0-based, across reconnects)


class ServerError(Exception):
    """The server refused an HTTP request; `status` and the server's one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class ControlError(Exception):
    """The server answered a control message with an `error`."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("message", "error"))
        self.reply = reply


class StreamClient:
    def __init__(self, url: str, prompt: str | None = None, *, params: dict[str, Any] | None = None,
                 token: str | None = None, session_id: str | None = None, resume_token: str | None = None,
                 ice_servers: list[dict[str, Any]] | None = None, codec: str | None = None, record: str | None = None,
                 buffer: int = 256, audio: str | Path | MediaStreamTrack | None = None,
                 reference: str | Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.prompt = prompt
        self.params = params
        self.session_id = session_id
        self.resume_token = resume_token  # what resuming `session_id` needs: the server gives it with the first answer
        self.codec = codec  # "vp8" | "h264" to ask for one; None: the server's preference
        self.ice_servers = ice_servers  # RTCIceServer fields ({"urls", "username", "credential"}); None: ask the server
        self.stats: dict[str, Any] | None = None  # the latest `stats` message
        self.notices: list[dict[str, Any]] = []  # acks and errors that answer no message of ours
        self.stalls: list[dict[str, Any]] = []  # `stall` messages: server-side faults recovered, oldest first
        self.frames_received = 0
        self.audio_received = 0  # samples of the server's audio track received (48 kHz mono), across reconnects
        # An avatar model's drive: a speech file (sent paced in real time, as a microphone would) or any audio
        # track, and the face picture, loaded here so a bad file is refused before connecting (MediaFileError).
        self.audio_track = SpeechTrack(load_speech(audio)) if isinstance(audio, (str, Path)) else audio
        self.reference = reference_data_url(reference) if reference is not None else None
        self.first_frame_s: float | None = None  # connect() start → first frame
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._recorder = Recorder(record, audio=self.audio_track is not None) if record else None
        self._frames: asyncio.Queue[ReceivedFrame] = asyncio.Queue(maxsize=buffer)
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._pc: RTCPeerConnection | None = None
        self._channel = None
        self._reader: asyncio.Task | None = None
        self._audio_reader: asyncio.Task | None = None
        self._http: aiohttp.ClientSession | None = None
        self._connected = False  # set after the first answered offer

    async def __aenter__(self) -> StreamClient:
        try:
            await self.connect()
        except BaseException:  # `async with` skips __aexit__ when __aenter__ fails: close the HTTP session here
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- connection --------------------------------------------------------------------------
    async def connect(self, timeout: float = 15.0) -> None:
        """Offer, answer, and wait until the control channel is open. With `session_id` (and its
        `resume_token`) set this resumes that session, replacing a viewer of it that is still connected (the
        first connect still sends `prompt`/`params`, applied as changes; later ones send neither)."""
        started = time.monotonic()
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers)
        if _is_loopback(urlsplit(self.url).hostname or ""):
            aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]  # aioice skips lo
        if self.ice_servers is None:
            self.ice_servers = (await self._request("GET", "/ice-servers"))["iceServers"]
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**s) for s in self.ice_servers]))
        transceiver = pc.addTransceiver("video", direction="recvonly")
        if self.codec:
            wanted = {"vp8": "video/VP8", "h264": "video/H264"}[self.codec]
            codecs = RTCRtpReceiver.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in codecs if c.mimeType in (wanted, "video/rtx")])
        if self.audio_track is not None:  # the avatar's drive goes out; the audio that drove the frames comes back
            pc.addTransceiver(self.audio_track, direction="sendrecv")
        channel = self._channel = pc.createDataChannel("control", ordered=True)
        opened = asyncio.get_running_loop().create_future()
        channel.on("open", lambda: opened.done() or opened.set_result(None))
        channel.on("message", self._on_message)
        track_ready: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        pc.on("track", lambda track: self._on_track(track, track_ready))
        await pc.setLocalDescription(await pc.createOffer())
        body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": "offer"}
        if not self._connected:  # a reconnect only resumes: the server kept prompt, params and reference
            body.update({k: v for k, v in (("prompt", self.prompt), ("params", self.params),
                                           ("reference", self.reference)) if v})
        if self.session_id:
            body.update(session_id=self.session_id, resume_token=self.resume_token, takeover=True)
        answer = await self._request("POST", "/offer", json=body)
        self.session_id, self.resume_token, self._connected = answer["session_id"], answer["resume_token"], True
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        track = await asyncio.wait_for(track_ready, timeout)
        await asyncio.wait_for(opened, timeout)
        self._reader = asyncio.ensure_future(self._read_frames(track, started))

    def _on_track(self, track: MediaStreamTrack, video: asyncio.Future[MediaStreamTrack]) -> None:
        """The video track completes `video`; an audio track (an avatar's voice) is read at once."""
        if track.kind == "video":
            video.done() or video.set_result(track)
        elif self._audio_reader is None:
            self._audio_reader = asyncio.ensure_future(self._read_audio(track))

    async def reconnect(self) -> None:
        """A new connection to the same session (within the server's grace period the stream continues)."""
        await self.drop()
        await self.connect()

    async def drop(self) -> None:
        """Close the peer connection without telling the server (as a crashed or vanished client would).
        A speech track sent goes on with the next connection."""
        for task in (self._reader, self._audio_reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._pc is not None:
            await self._pc.close()
        self._pc = self._channel = self._reader = self._audio_reader = None

    async def close(self, delete: bool = True) -> None:
        """End the session (DELETE on the server unless `delete=False`), stop the audio track sent, finish any
        recording."""
        if delete and self.session_id and self._http is not None:
            with contextlib.suppress(aiohttp.ClientError, ServerError):
                await self._request("DELETE", f"/sessions/{self.session_id}")
        await self.drop()
        if self.audio_track is not None:
            self.audio_track.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._recorder is not None:
            self._recorder.close()
        for future in self._pending.values():
            future.cancel()

    async def session(self) -> dict[str, Any]:
        """`GET /sessions/{id}`: the server's view of this session."""
        return await self._request("GET", f"/sessions/{self.session_id}")

    # --- frames ----------------------------------------------------------------------------
    async def next_frame(self, timeout: float = 10.0) -> ReceivedFrame:
        return await asyncio.wait_for(self._frames.get(), timeout)

    def drain(self) -> list[ReceivedFrame]:
        """Every frame buffered so far (oldest first), without waiting."""
        frames = []
        while not self._frames.empty():
            frames.append(self._frames.get_nowait())
        return frames

    async def _read_frames(self, track: MediaStreamTrack, started: float) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            received = ReceivedFrame(frame.to_ndarray(format="rgb24"), int(frame.pts), time.monotonic(), self.frames_received)
            if self.first_frame_s is None:
                self.first_frame_s = received.time - started
            self.frames_received += 1
            if self._recorder is not None:
                self._recorder.write(received.image, received.time)
            if self._frames.full():  # a slow consumer sees the newest frames, not a backlog
                self._frames.get_nowait()
            self._frames.put_nowait(received)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        """The server's audio (for an avatar: the samples that drove the frames), counted and recorded."""
        mono = MonoConverter()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            samples = mono(frame)
            self.audio_received += len(samples)
            if self._recorder is not None:
                self._recorder.write_audio(samples, time.monotonic())

    # --- control ---------------------------------------------------------------------------
    async def send(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send one control message and await its `ack` (raises ControlError on an `error` reply)."""
        if self._channel is None or self._channel.readyState != "open":
            raise ConnectionError("the control channel is not open")
        msg_id = next(self._ids)
        future = self._pending[msg_id] = asyncio.get_running_loop().create_future()
        self._channel.send(json.dumps({**message, "id": msg_id}))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(msg_id, None)

    def send_raw(self, text: str | bytes) -> None:
        """Send anything on the control channel (replies land in `notices`); for tests and debugging."""
        assert self._channel is not None
        self._channel.send(text)

    async def send_prompt(self, prompt: str, transition: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "prompt", "prompt": prompt}
        if transition:
            message["transition"] = transition
        return await self.send(message, timeout)

    async def set_params(self, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        return await self.send({"type": "params", "params": params}, timeout)

    async def pause(self) -> dict[str, Any]:
        return await self.send({"type": "pause"})

    async def resume(self) -> dict[str, Any]:
        return await self.send({"type": "resume"})

    async def reset(self) -> dict[str, Any]:
        return await self.send({"type": "reset"})

    def _on_message(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if message.get("type") == "stats":
            self.stats = message
            return
        if message.get("type") == "stall":
            self.stalls.append(message)
            return
        future = self._pending.get(message.get("id"))
        if future is None or future.done():
            self.notices.append(message)
        elif message.get("type") == "error":
            future.set_exception(ControlError(message))
        else:
            future.set_result(message)

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        assert self._http is not None
        async with self._http.request(method, self.url + path, **kwargs) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                data = {"error": (await response.text())[:200]}
            if response.status >= 400:
                raise ServerError(response.status, data.get("error", "") if isinstance(data, dict) else str(data))
            return data


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
