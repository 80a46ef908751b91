"""`GET /sessions/{id}/audio`: an agent pushes an avatar session's audio over a WebSocket — the serving side of
LiveKit's avatar contract (spec avatar.md §6: the `lk.audio_stream` byte stream, `lk.clear_buffer`,
`lk.playback_finished`).

- Binary messages: PCM s16le mono at the connection's rate, `?sample_rate=N` (default 16000; one of
  `pcm.SUPPORTED_RATES`, anything else is a 400 before the upgrade; a `format` message changes it later), at
  most 1 s of audio each. Rates other than 16 kHz are resampled by one filter kept across messages. Faster than
  real time is expected: up to 30 s waits in the session's buffer, past that a message is refused whole.
- Text messages, JSON: `{"type": "clear"}` — barge-in: the audio not shown yet is dropped and the avatar stops
  speaking at the next chunk; `{"type": "flush"}` — the end of an utterance; `{"type": "format",
  "sample_rate": N}`.
- From the server: `ready` first (what the socket takes); `playback_finished` `{position, interrupted}` once
  per utterance — when its audio has been shown (position: its length in s), or at a clear (interrupted,
  position: how much of it was shown); `error` `{message, of}` for a bad message, after which the socket and
  the session go on. A message over 1 MiB is closed by aiohttp with code 1009.
- The same bearer token as the other routes; a page from another site is refused (403, as the other routes'
  writes). One audio source per session: a second socket, or one while the viewer's microphone feeds it, is
  a 409. When the session ends, unfinished utterances are reported interrupted and the socket closes (1001).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel, ValidationError

from ..errors import InputError
from .appstate import CONFIG, MANAGER, METRICS, error
from .avatar import SessionAvatar
from .errors import describe
from .limits import cross_site
from .metrics import Metrics
from .pcm import MAX_MESSAGE_S, SUPPORTED_RATES, PcmStream
from .playback import Playback
from .protocol import (
    AUDIO_CONTROL,
    MAX_MESSAGE_BYTES,
    AudioClear,
    AudioFlush,
    AudioFormat,
    AudioReady,
    Error,
    load_json,
)
from .session import Session

log = logging.getLogger(__name__)

MAX_WS_BYTES = 1024 * 1024
AUDIO_PROTOCOL = "streamgen.audio"  # the subprotocol answered when offered (a browser offers it beside bearer.<token>)
OUTBOX = 256  # replies waiting for a client that does not read them; more are dropped
MESSAGES = {"clear": AudioClear, "flush": AudioFlush, "format": AudioFormat}


async def audio_socket(request: web.Request) -> web.StreamResponse:
    sid = request.match_info["sid"]
    if (refusal := cross_site(request, request.app[CONFIG].allowed_origins)) is not None:
        return error(403, refusal)
    session = request.app[MANAGER].get(sid)
    if session is None:
        return error(404, f"no session {sid!r}")
    if session.avatar is None:
        return error(409, f"session {sid} is not audio-driven: its model takes no audio")
    try:
        pcm = PcmStream(_rate(dict(request.query)), session.avatar.audio.sample_rate)
    except InputError as exc:
        return error(400, str(exc))
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_BYTES, protocols=(AUDIO_PROTOCOL,))
    if not ws.can_prepare(request).ok:
        return error(426, f"GET /sessions/{sid}/audio takes a WebSocket (Upgrade: websocket)", Upgrade="websocket")
    push = AudioPush(session, ws, pcm, request.app[METRICS])
    if not session.avatar.claim(push, "websocket", push):
        return error(409, f"session {sid} already takes its audio from its {session.avatar.source}: one source at a time")
    try:
        await ws.prepare(request)
        await push.run()
    finally:
        session.avatar.release(push)
    return ws


def _rate(query: dict[str, str]) -> int:
    rate = query.pop("sample_rate", "16000")
    if query:
        raise InputError(f"unknown query parameter{'s' if len(query) > 1 else ''} {', '.join(map(repr, query))} "
                         "(known: sample_rate)")
    if not rate.isdigit():
        raise InputError(f"sample_rate must be a whole number of Hz, got {rate[:20]!r}")
    return int(rate)


class AudioPush:
    """One agent's audio socket: messages in order, replies through a bounded outbox."""

    def __init__(self, session: Session, ws: web.WebSocketResponse, pcm: PcmStream, metrics: Metrics) -> None:
        assert session.avatar is not None
        self.session, self.ws, self.pcm, self.metrics = session, ws, pcm, metrics
        self.avatar: SessionAvatar = session.avatar
        self.playback = Playback(self.avatar.audio.sample_rate)
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue(OUTBOX)
        self._dropping = False

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._write())
        audio = self.avatar.audio
        self.send(AudioReady(session_id=self.session.id, sample_rate=self.pcm.rate, model_sample_rate=audio.sample_rate,
                             supported_rates=list(SUPPORTED_RATES), capacity_s=audio.capacity / audio.sample_rate,
                             max_message_s=MAX_MESSAGE_S))
        try:
            async for message in self.ws:
                if message.type is WSMsgType.BINARY:
                    self._audio(message.data)
                elif message.type is WSMsgType.TEXT:
                    self._control(message.data)
        finally:
            writer.cancel()

    # --- PlaybackListener ------------------------------------------------------------------------------------
    def played(self, position: int) -> None:
        for finished in self.playback.played(position):
            self.send(finished)

    def closed(self) -> None:
        for finished in self.playback.interrupt(self.avatar.audio.position, self.avatar.played):
            self.send(finished)
        self.send(None)

    # --- messages --------------------------------------------------------------------------------------------
    def _audio(self, data: bytes) -> None:
        try:
            samples = self.pcm.samples(data)
        except InputError as exc:
            return self._error(str(exc), "audio")
        if self._push(samples, "audio"):
            self._ok()

    def _push(self, samples: np.ndarray, of: str) -> bool:
        start = self.avatar.audio.position
        try:
            self.avatar.audio.push(samples)
        except InputError as exc:  # AudioOverflowError: too far ahead of the video
            self._error(str(exc), of)
            return False
        if len(samples):
            self.playback.pushed(start)
        return True

    def _control(self, raw: str) -> None:
        try:
            message = AUDIO_CONTROL.validate_python(load_json(raw, "message", MAX_MESSAGE_BYTES))
        except ValidationError as exc:
            return self._error(describe(exc, MESSAGES), _kind(raw))
        except InputError as exc:  # size, encoding, depth, syntax
            return self._error(str(exc), None)
        if isinstance(message, AudioClear):
            self.pcm.reset()
            self.session.clear_audio()
            replies = self.playback.interrupt(self.avatar.audio.position, self.avatar.played)
        elif isinstance(message, AudioFlush):
            self._push(self.pcm.drain(), "flush")
            replies = self.playback.flush(self.avatar.audio.position, self.avatar.played)
        else:
            try:
                rest = self.pcm.set_rate(message.sample_rate)
            except InputError as exc:
                return self._error(str(exc), "format")
            self._push(rest, "format")
            replies = []
        self._ok()
        for reply in replies:
            self.send(reply)

    def _ok(self) -> None:
        self.metrics.inc("streamgen_audio_messages_total", result="ok")

    def _error(self, message: str, of: str | None) -> None:
        self.metrics.inc("streamgen_audio_messages_total", result="error")
        self.send(Error(message=message, of=of))

    # --- out ---------------------------------------------------------------------------------------------------
    def send(self, message: BaseModel | None) -> None:
        """Queue a reply; None closes the socket once the replies before it are out (the session ended)."""
        try:
            self._outbox.put_nowait(None if message is None else message.model_dump_json(exclude_none=True))
        except asyncio.QueueFull:
            if message is None:
                asyncio.ensure_future(self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"session closed"))
            elif not self._dropping:
                log.warning("session %s: the audio socket's client reads no replies; dropping them", self.session.id)
            self._dropping = True

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionError):
            while (text := await self._outbox.get()) is not None:
                await self.ws.send_str(text)
            await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"session closed")


def _kind(raw: str) -> str | None:
    """The `type` of a message that may be invalid, when it is one of ours, to label its error."""
    with contextlib.suppress(InputError):
        data = load_json(raw, "message", MAX_MESSAGE_BYTES)
        if isinstance(data, dict) and data.get("type") in MESSAGES:
            return data["type"]
    return None


def add_audio_routes(app: web.Application) -> None:
    app.router.add_get("/sessions/{sid}/audio", audio_socket)
