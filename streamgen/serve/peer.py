"""One WebRTC connection serving a session: the paced video track out, the `control` channel both ways,
and, for a video-to-video session, the client's camera in (on the same, sendrecv, video section). For an
avatar session the offer's (first) audio section carries the audio that drove the video back, on the
video's media clock (`audio_track.py`), and, when the client sends on it (sendrecv), its microphone in as the
session's audio (`audio_in.py`).

Transport only: losing it (connection failed/closed, control channel closed) hands the session back
to its grace period; the session's stream is untouched.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from aiortc import (
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.rtcsctptransport import WEBRTC_STRING, RTCSctpTransport
from aiortc.sdp import SessionDescription
from pydantic import BaseModel

from . import audio_in, ice, ingest
from .audio_track import MediaClock, PacedAudioTrack
from .config import ServeConfig
from .control import ControlHandler
from .encoder import VideoEncoder
from .metrics import Metrics
from .protocol import Error
from .session import Session
from .track import PacedVideoTrack

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 64  # messages kept while the control channel is not open yet (acks of offer-time changes)



def keep_invalid_text(sctp: RTCSctpTransport) -> None:
    """A text frame that is not UTF-8 reaches the channel as bytes (answered with an error by the control
    protocol) instead of raising inside aiortc's receive loop, which would drop the whole connection."""
    receive = sctp._data_channel_receive

    async def guarded(stream_id: int, pp_id: int, data: bytes) -> None:
        if pp_id == WEBRTC_STRING and (channel := sctp._data_channels.get(stream_id)) is not None:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                channel.emit("message", bytes(data))
                return
        await receive(stream_id, pp_id, data)

    sctp._data_channel_receive = guarded

class Peer:
    def __init__(self, session: Session, config: ServeConfig, metrics: Metrics) -> None:
        self.session = session
        self.config = config
        self.codec: str | None = None
        self.pc = RTCPeerConnection(ice.configuration(config.ice_servers))
        self._control = ControlHandler(session, config.control_rate, metrics)
        self._channel: RTCDataChannel | None = None
        self._inbox: asyncio.Queue[str | bytes] = asyncio.Queue(maxsize=256)
        self._outbox: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("datachannel", self._on_datachannel)

    async def answer(self, offer_sdp: str) -> RTCSessionDescription:
        """Negotiate: our codec preference, then the track that encodes with the negotiated codec."""
        if ice.is_loopback(self.config.host):
            offer_sdp = ice.loopback_candidates_only(offer_sdp)
        video_in = self.session.video is not None  # V2V: the client's camera comes in on the same section
        # claims the offer's video section
        transceiver = self.pc.addTransceiver("video", direction="sendrecv" if video_in else "sendonly")
        transceiver.setCodecPreferences(ice.codec_preferences(self.config.codec))
        audio = self._claim_audio(offer_sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        for other in self.pc.getTransceivers():
            if other not in (transceiver, audio):
                other.direction = "inactive"  # audio of other models, extra sections: not taken (and not decoded)
        if self.pc.sctp is not None:
            keep_invalid_text(self.pc.sctp)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self.codec = ice.negotiated_codec(self.pc.localDescription.sdp)
        encoder = VideoEncoder(self.codec, self.session.fps, self.config.bitrate, self.config.keyframe_interval_s)
        self._tasks = [asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._stats_loop())]
        clock = self._start_audio(audio) if audio is not None else None
        transceiver.sender.replaceTrack(PacedVideoTrack(self.session, encoder, self.session.fps, clock))
        camera = transceiver.receiver.track if video_in and transceiver.currentDirection == "sendrecv" else None
        if camera is not None:  # the client sends video on the section we answered sendrecv: the session's input
            self._tasks.append(asyncio.ensure_future(ingest.receive(camera, self.session.video, self.session.id)))
        return self.pc.localDescription

    def _claim_audio(self, offer_sdp: str) -> RTCRtpTransceiver | None:
        """An avatar session takes the offer's first audio section (before the offer is applied, as for video)."""
        if self.session.avatar is None or all(m.kind != "audio" for m in SessionDescription.parse(offer_sdp).media):
            return None
        return self.pc.addTransceiver("audio", direction="sendrecv")

    def _start_audio(self, audio: RTCRtpTransceiver) -> MediaClock | None:
        """Once negotiated: the audio track out if the client receives it, the microphone in if it sends."""
        avatar = self.session.avatar
        assert avatar is not None
        direction = audio.currentDirection or "inactive"
        if direction in ("sendrecv", "recvonly"):
            self._tasks.append(asyncio.ensure_future(audio_in.receive(audio.receiver.track, avatar, self.session.id)))
        if direction not in ("sendrecv", "sendonly"):
            return None
        clock = MediaClock(avatar.audio.sample_rate, avatar.audio.samples_per_frame)
        audio.sender.replaceTrack(PacedAudioTrack(clock, self.session))
        return clock

    def send(self, message: BaseModel) -> None:
        text = message.model_dump_json(exclude_none=True)
        if self._channel is not None and self._channel.readyState == "open":
            self._channel.send(text)
        elif not self._closed and len(self._outbox) < OUTBOX_LIMIT:
            self._outbox.append(text)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        try:
            await self.pc.close()
        except Exception as exc:  # aiortc tears down transports an offer that failed half-way never started
            log.debug("closing a half-negotiated peer: %s: %s", type(exc).__name__, exc)

    # --- events --------------------------------------------------------------------------------
    async def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.session.on_connected(self)
        elif state in ("failed", "closed"):
            self.session.on_peer_lost(self, f"connection {state}")
            await self.close()

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != "control" or self._channel is not None:
            channel.close()  # one control channel per connection; nothing else is spoken
            return
        self._channel = channel
        channel.on("message", self._on_message)
        channel.on("close", lambda: asyncio.ensure_future(self._on_channel_closed()))
        for text in self._outbox:
            channel.send(text)
        self._outbox.clear()

    def _on_message(self, raw: str | bytes) -> None:
        try:
            self._inbox.put_nowait(raw)
        except asyncio.QueueFull:  # far beyond the rate limit: answered rather than queued
            self.send(Error(message="too many control messages waiting; message ignored"))

    async def _on_channel_closed(self) -> None:
        self.session.on_peer_lost(self, "control channel closed")
        await self.close()

    # --- loops -------------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        """Handle control messages one at a time, so their changes queue in arrival order."""
        while True:
            raw = await self._inbox.get()
            try:
                reply = await self._control.handle(raw)
            except Exception:  # a bug must cost one message, not the connection
                log.exception("session %s: control message failed", self.session.id)
                reply = Error(message="internal error while applying this message; the stream continues")
            if reply is not None:
                self.send(reply)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            if self._channel is not None and self._channel.readyState == "open":
                with contextlib.suppress(Exception):
                    self.send(self.session.stats())
