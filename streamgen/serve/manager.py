"""Session registry: admission (capacity, per-IP limit), resume within the grace period, reaping.

Capacity itself is the backend's (`CapacityError` carries the reason the client sees); this adds the
per-client limit and closes sessions whose peer did not (re)connect by their deadline.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from aiortc import RTCSessionDescription

from ..backends import Backend, CapacityError
from ..engine.frame_stream import FrameStream
from ..engine.prompts import Transition
from .avatar import SessionAvatar, open_avatar_stream, reference_problem
from .config import ServeConfig
from .ingest import SessionVideo, open_video_stream, video_problem
from .metrics import Metrics
from .peer import Peer
from .protocol import Offer, StreamParams
from .session import Session

log = logging.getLogger(__name__)


class Refused(Exception):
    """An offer the server will not serve: HTTP `status` with `reason` for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class SessionManager:
    def __init__(self, backend: Backend, config: ServeConfig, metrics: Metrics) -> None:
        self.backend = backend
        self.config = config
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self._admitting: Counter[str] = Counter()  # offers past the per-address check, not yet sessions
        self._reaper: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()  # session closes started by the reaper, referenced until done
        # Blocking work off the event loop, each kind in its own bounded pool so one cannot starve another:
        # opening a stream (a Ray admission can wait minutes) and applying controls (encoding a prompt).
        self._admission = ThreadPoolExecutor(2, thread_name_prefix="admission")
        self._controls = ThreadPoolExecutor(2, thread_name_prefix="controls")
        self.preempt: Callable[[], bool] | None = None  # frees a stream a render job holds (live sessions first)

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def offer(self, offer: Offer, client_ip: str) -> tuple[Session, RTCSessionDescription]:
        """Answer an offer: a new session, or the one named by `session_id` (resume)."""
        if offer.session_id is not None:
            return await self._resume(offer, client_ip)
        if (problem := reference_problem(self.backend.bundle, offer.reference, offer.video is not None)) is not None:
            raise Refused(400, problem)
        if offer.video is not None and (problem := video_problem(offer.sdp)) is not None:
            raise Refused(400, problem)
        mine = sum(1 for s in self.sessions.values() if s.client_ip == client_ip) + self._admitting[client_ip]
        if mine >= self.config.max_sessions_per_ip:
            raise Refused(429, f"this client already has {mine} sessions (limit {self.config.max_sessions_per_ip} per address); "
                               "close one (DELETE /sessions/ID) or resume it with its session_id")
        prompt = offer.prompt or self.config.prompt or self.backend.bundle.example_prompt
        self._admitting[client_ip] += 1  # offers racing through the await below count against the limit too
        try:
            loop = asyncio.get_running_loop()
            try:
                # CapacityError, InputError
                stream, video, avatar = await loop.run_in_executor(self._admission, self._open, prompt, offer)
            except CapacityError:
                if self.preempt is None or not await loop.run_in_executor(self._admission, self.preempt):
                    raise
                stream, video, avatar = await loop.run_in_executor(self._admission, self._open, prompt, offer)
            session = Session(secrets.token_urlsafe(12), stream, self.backend, self.config, self.metrics, client_ip,
                              self._forget, self._controls, video, avatar)
            self.sessions[session.id] = session
        finally:
            self._admitting[client_ip] -= 1
            if not self._admitting[client_ip]:
                del self._admitting[client_ip]
        session.start()
        try:
            answer = await self._connect(session, offer.sdp)
        except BaseException:
            await session.close("offer failed")
            raise
        self.metrics.inc("streamgen_sessions_opened_total")
        return session, answer

    def _open(self, prompt: str, offer: Offer) -> tuple[FrameStream, SessionVideo | None, SessionAvatar | None]:
        """A new stream for the offer (blocking): audio-driven for an avatar model, video-to-video when the
        offer asks for `video`, else text-to-video."""
        overrides = _overrides(offer.params)
        if self.backend.bundle.avatar is not None:
            stream, avatar = open_avatar_stream(self.backend, prompt, overrides, offer.reference)
            return stream, None, avatar
        if offer.video is None:
            return self.backend.open(prompt, overrides), None, None
        return *open_video_stream(self.backend, prompt, overrides, offer.video.strength), None

    async def _resume(self, offer: Offer, client_ip: str) -> tuple[Session, RTCSessionDescription]:
        session = self.sessions.get(offer.session_id or "")
        if session is None:
            raise Refused(404, f"no session {offer.session_id!r}: it ended or its {self.config.grace_s:g} s grace period "
                               "passed; send the offer without session_id to start a new one")
        if not hmac.compare_digest((offer.resume_token or "").encode(), session.resume_token.encode()):
            raise Refused(403, f"resuming session {session.id} needs the resume_token its first answer gave")
        if offer.reference is not None:
            raise Refused(409, f"session {session.id} keeps the reference picture it started with; send the offer "
                               "without session_id to start a session with another one")
        if offer.video is not None and session.video is None:
            raise Refused(409, f"session {session.id} was opened without video input, which is chosen when a session "
                               "starts; send the offer without session_id to start a video-to-video session")
        if session.state == "streaming" and not offer.takeover:
            raise Refused(409, f"session {session.id} has a connected viewer; resume it once that viewer is gone, "
                               "or send takeover: true to replace it")
        answer = await self._connect(session, offer.sdp)
        if offer.params is not None and offer.params.changes():
            await session.set_params(offer.params.changes(), None)
        if offer.prompt is not None and offer.prompt != session.stream.stream.prompt:
            await session.set_prompt(offer.prompt, None, None)
        self.metrics.inc("streamgen_sessions_resumed_total")
        log.info("session %s resumed from %s", session.id, client_ip)
        return session, answer

    async def _connect(self, session: Session, sdp: str) -> RTCSessionDescription:
        peer = Peer(session, self.config, self.metrics)
        try:
            answer = await peer.answer(sdp)
        except Exception as exc:
            await peer.close()
            raise Refused(400, f"cannot negotiate this offer: {exc}"[:300]) from exc
        old = session.attach(peer)
        if old is not None:
            await old.close()
        return answer

    def get(self, sid: str) -> Session | None:
        return self.sessions.get(sid)

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(s.close("shutdown") for s in list(self.sessions.values())), *self._closing)
        self._admission.shutdown(wait=False, cancel_futures=True)
        self._controls.shutdown(wait=False, cancel_futures=True)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("connecting", "streaming", "detached"), 0)
        for session in self.sessions.values():
            counts[session.state] = counts.get(session.state, 0) + 1
        return counts

    def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    async def _reap(self) -> None:
        """Close sessions whose peer did not connect, or reconnect, by their deadline."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.deadline is not None and now > session.deadline:
                    reason = "grace expired" if session.state == "detached" else "connect timeout"
                    task = asyncio.get_running_loop().create_task(session.close(reason))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)


def _overrides(params: StreamParams | None) -> dict[str, Any]:
    """Offer params → StreamConfig fields for a new stream."""
    changes = params.changes() if params else {}
    if "steps" in changes:
        changes["steps"] = tuple(changes["steps"])
    if "transition" in changes:
        changes["transition"] = Transition(**changes["transition"])
    return changes
