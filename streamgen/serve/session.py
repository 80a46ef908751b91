"""A generation session: its own FrameStream and frame queue, its controls, and the sink through which
the backend's engine loop delivers its chunks (paced just in time for playback).

The session is the *generation* state; the WebRTC connection serving it (`Peer`) is transport only.
When the peer goes away the session waits `grace_s` for a reconnect with its id, which resumes the
same stream (frame index continues) instead of starting over (Scope PR #642's lesson).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
from pydantic import BaseModel

from ..backends import Backend
from ..bundles.family import TransitionSpec
from ..engine.frame_stream import FrameChunk, FrameStream
from ..engine.prompts import Transition
from ..errors import InputError
from .config import ServeConfig
from .encoder import DisplayScaler, VideoEncoder
from .frames import Frame, FrameQueue, Pacer
from .metrics import Metrics
from .protocol import AckMessage, Error, Stall, Stats
from .publish import Publication
from .recording import Recording

if TYPE_CHECKING:
    from .avatar import SessionAvatar
    from .ingest import SessionVideo
    from .peer import Peer

log = logging.getLogger(__name__)


class Session:
    def __init__(self, sid: str, stream: FrameStream, backend: Backend, config: ServeConfig, metrics: Metrics,
                 client_ip: str, on_closed: Callable[[Session], None], controls: Executor,
                 video: SessionVideo | None = None, avatar: SessionAvatar | None = None) -> None:
        """`controls` runs the blocking part of a control (encoding a prompt) off the event loop; `video`:
        the input of a video-to-video session (its peers receive the client's camera into it); `avatar`: the
        audio of an audio-driven session (its frames carry the audio that drove them)."""
        self.id = sid
        self.resume_token = secrets.token_urlsafe(24)  # the id is public (URLs, logs); resuming needs this too
        self.stream = stream
        self.fps = stream.fps
        self.client_ip = client_ip
        self.state = "connecting"  # connecting → streaming ⇄ detached → closed
        self.paused = False
        self.last: Frame | None = None  # the frame on screen: held while nothing newer is due
        self.peer: Peer | None = None
        self.deadline: float | None = None  # monotonic time by which a peer must be connected
        self._backend, self._config, self._metrics, self._on_closed = backend, config, metrics, on_closed
        self._loop = asyncio.get_running_loop()
        self._controls = controls
        self.queue = FrameQueue(self._loop, on_room=self._on_room)
        self._pacer = Pacer(stream.fps, config.queue_chunks)
        self._scaler = DisplayScaler(config.display_size)
        self._handle = None  # the backend's handle on our generation, from start()
        self._created = time.monotonic()
        self._offered_at: float | None = None
        self._first_frame_s: float | None = None
        self._latency: deque[float] = deque(maxlen=32)
        self._counts = dict.fromkeys(("generated", "sent", "held", "dropped"), 0)
        self._stalls = 0  # backend recoveries this session went through
        self._window = (time.monotonic(), 0, 0.0)  # (start, new frames sent, sum of their ages)
        self.recording: Recording | None = None  # the latest; a new start begins a new file
        self.publication: Publication | None = None  # the latest RTMP push
        self._recordings = 0
        self.video = video
        self.avatar = avatar
        if video is not None:  # the first chunk waits for the camera's first frame, at most until connect timeout
            self._video_wait_until = self._created + config.connect_timeout_s
            video.frames.on_first = self._on_room

    def start(self) -> None:
        self._handle = self._backend.start(self.id[:8], self.stream, self)

    def _on_room(self) -> None:
        if self._handle is not None:
            self._handle.wake()

    # --- transport ---------------------------------------------------------------------------
    def attach(self, peer: Peer) -> Peer | None:
        """Serve this session through `peer`; returns the peer it replaces (the caller closes it)."""
        old, self.peer = self.peer, peer
        self.state = "connecting"
        self.deadline = time.monotonic() + self._config.connect_timeout_s
        self._offered_at = time.monotonic()
        return old

    def on_connected(self, peer: Peer) -> None:
        if peer is self.peer and self.state != "closed":
            self.state, self.deadline = "streaming", None

    def on_peer_lost(self, peer: Peer, why: str) -> None:
        """The peer failed or closed: keep the stream for `grace_s` so the client can resume it."""
        if peer is not self.peer or self.state == "closed":
            return
        log.info("session %s: peer lost (%s); waiting %.0f s for a reconnect", self.id, why, self._config.grace_s)
        self.peer, self.state = None, "detached"
        self.deadline = time.monotonic() + self._config.grace_s

    def send(self, message: BaseModel) -> None:
        if self.peer is not None:
            self.peer.send(message)

    # --- controls (event loop) -----------------------------------------------------------------
    async def set_prompt(self, prompt: str, transition: TransitionSpec | None, msg_id: str | int | None) -> None:
        """Queue a prompt change for the next chunk boundary; its ack (with `msg_id`) comes when that chunk is made."""
        spec = Transition(**transition.model_dump()) if transition else None
        await self._queued(lambda: self.stream.set_prompt(prompt, spec, tag=msg_id))  # encodes the prompt: off the loop

    async def set_params(self, changes: dict[str, Any], msg_id: str | int | None) -> None:
        await self._queued(lambda: self.stream.set_params(msg_id, **changes))

    async def reset(self, msg_id: str | int | None) -> None:
        await self._queued(lambda: self.stream.reset(msg_id))

    def pause(self, msg_id: str | int | None) -> AckMessage:
        """Freeze on the frame now on screen, at once: queued frames wait (Scope PR #43: no play-out), and no
        new chunk starts (a reset still lands, so it is acknowledged)."""
        self.paused = True
        if self._handle is not None:
            self._handle.pause()
        return AckMessage(of="pause", frame=self.last.index if self.last else 0, id=msg_id)

    def resume(self, msg_id: str | int | None) -> AckMessage:
        self.paused = False
        if self._handle is not None:
            self._handle.resume()
        following = self.queue.peek_index()
        return AckMessage(of="resume", frame=following if following is not None else (self.last.index + 1 if self.last else 0),
                   id=msg_id)

    def clear_audio(self) -> None:
        """Interrupt an avatar session's speech: buffered audio and unshown frames are dropped, the next chunk
        starts at once (from silence)."""
        assert self.avatar is not None
        if flushed := self.avatar.clear(self.queue):
            self._count_dropped(flushed, "clear")
        self._on_room()

    async def _queued(self, call: Callable[[], None]) -> None:
        await self._loop.run_in_executor(self._controls, call)
        self._on_room()  # a queued reset makes a paused stream schedulable

    # --- the sink: called on the backend's generation thread ---------------------------------------
    def wants_chunk(self) -> bool:
        """Just in time: when the frames still queued cover the next chunk's expected compute time."""
        if self.video is not None and not self.video.frames.started and time.monotonic() < self._video_wait_until:
            return False
        return not self.queue.closed and self.queue.depth <= self._pacer.ahead()

    def deliver(self, chunk: FrameChunk, seconds: float) -> None:
        born = time.monotonic() - seconds
        images = self._scaler(chunk.frames.cpu().numpy())
        self._pacer.observe(seconds, len(images))
        flushed = self.queue.flush() if any(a.of == "reset" for a in chunk.acks) else 0
        self._on_chunk(chunk, seconds, flushed)
        frames = [Frame(chunk.first_frame + i, image, born) for i, image in enumerate(images)]
        if self.avatar is None:
            self.queue.put(frames)
        elif withheld := self.avatar.put(self.queue, chunk, frames):
            self._count_dropped(withheld, "clear")

    def fail(self, exc: BaseException) -> None:
        self._on_error(exc)

    def _count_dropped(self, frames: int, reason: str) -> None:
        """Frames generated but never shown (any thread)."""
        self._metrics.inc("streamgen_frames_dropped_total", frames, reason=reason)
        self._loop.call_soon_threadsafe(lambda: self._counts.update(dropped=self._counts["dropped"] + frames))

    def _on_chunk(self, chunk: FrameChunk, seconds: float, flushed: int) -> None:
        self._metrics.inc("streamgen_frames_generated_total", len(chunk.frames))
        self._metrics.observe("streamgen_chunk_latency_seconds", seconds)
        if flushed:
            self._metrics.inc("streamgen_frames_dropped_total", flushed, reason="reset")
        if chunk.stall:
            self._metrics.inc("streamgen_stalls_total", chunk.stall["events"])
        self._loop.call_soon_threadsafe(self._chunk_done, chunk, seconds, flushed)

    def _chunk_done(self, chunk: FrameChunk, seconds: float, flushed: int) -> None:
        self._counts["generated"] += len(chunk.frames)
        self._counts["dropped"] += flushed
        self._latency.append(seconds)
        if chunk.stall:  # before the acks: the recovery happened before this chunk's changes took effect
            stall = chunk.stall
            self._stalls += stall["events"]
            self.send(Stall(frame=chunk.first_frame, reason=stall["reason"], recovery_s=round(stall["recovery_s"], 3),
                            events=stall["events"], replaced=stall.get("replaced", [])))
        for ack in chunk.acks:
            self.send(AckMessage(of=ack.of, frame=ack.frame, id=ack.tag, detail=ack.detail or None))

    def _on_error(self, exc: BaseException) -> None:
        log.error("session %s: generation failed", self.id, exc_info=exc)
        message = f"generation failed: {type(exc).__name__}: {exc}"[:300]

        async def fail() -> None:
            self.send(Error(message=message))
            await self.close("error")

        asyncio.run_coroutine_threadsafe(fail(), self._loop)

    # --- track callback ---------------------------------------------------------------------------
    def on_sent(self, frame: Frame, new: bool, dropped: int) -> None:
        now = time.monotonic()
        if self._offered_at is not None:
            self._first_frame_s = now - self._offered_at
            self._metrics.observe("streamgen_first_frame_seconds", self._first_frame_s)
            self._offered_at = None
        self.last = frame
        if new and self.avatar is not None:
            self.avatar.shown(frame)
        self._counts["sent" if new else "held"] += 1
        self._metrics.inc("streamgen_frames_sent_total" if new else "streamgen_frames_held_total")
        if dropped:
            self._counts["dropped"] += dropped
            self._metrics.inc("streamgen_frames_dropped_total", dropped, reason="late")
        if new:
            start, count, ages = self._window
            self._window = (start, count + 1, ages + now - frame.born)

    def on_packet(self, packet: av.Packet, encoder: VideoEncoder) -> None:
        if self.publication is not None:
            self.publication.write(packet, encoder)  # copies the bytes: before the recording restamps the packet
        if self.recording is None or self.recording.stopped is not None:
            return
        try:
            self.recording.write(packet, encoder)
        except Exception as exc:  # a full disk ends the recording, never the stream
            log.warning("session %s: recording %s stopped: %s", self.id, self.recording.path, exc)
            self.recording.stop()
            self.send(Error(message=f"recording stopped: {type(exc).__name__}: {exc}"[:300]))

    # --- publishing --------------------------------------------------------------------------------
    def start_publishing(self, url: str) -> Publication:
        """Push what the viewer is sent to `url` (already allow-listed) from the next keyframe on."""
        if self.publication is not None and self.publication.stopped is None:
            raise InputError(f"session {self.id} is already publishing: stop it first")
        if self.peer is None or self.peer.codec is None:
            raise InputError("no viewer is connected: publishing takes the video a viewer is sent")
        loop = asyncio.get_running_loop()
        self.publication = Publication(url, self.peer.codec, self.fps, lambda message: loop.call_soon_threadsafe(
            self.send, Error(message=f"publishing stopped: {message}"[:300])))
        return self.publication

    def stop_publishing(self) -> Publication | None:
        if self.publication is not None:
            self.publication.stop()
        return self.publication

    # --- recording ---------------------------------------------------------------------------------
    def start_recording(self, folder: Path) -> Recording:
        """Record what the viewer is sent from the next keyframe on, into a new file under `folder`."""
        if self.recording is not None and self.recording.stopped is None:
            return self.recording
        if self.peer is None or self.peer.codec is None:
            raise InputError("no viewer is connected: a recording takes the video a viewer is sent")
        self._recordings += 1
        self.recording = Recording(folder / f"{self.id}-{self._recordings}", self.peer.codec, self.fps)
        return self.recording

    def stop_recording(self) -> Recording | None:
        if self.recording is not None:
            self.recording.stop()
        return self.recording

    # --- reporting ---------------------------------------------------------------------------------
    def stats(self) -> Stats:
        """Since the previous call: new frames shown per second and their mean age (generation → send)."""
        now = time.monotonic()
        start, count, ages = self._window
        self._window = (now, 0, 0.0)
        return Stats(fps=round(count / max(now - start, 1e-3), 2), latency_ms=round(1000 * ages / count, 1) if count else 0.0,
                     frame=self.last.index if self.last else -1, queue_depth=self.queue.depth, paused=self.paused,
                     avatar=self.avatar.stats() if self.avatar is not None else None)

    def describe(self) -> dict[str, Any]:
        prompt = self.stream.stream.prompt
        return {
            "session_id": self.id, "state": self.state, "prompt": prompt if isinstance(prompt, str) else None,
            "paused": self.paused, "fps": self.fps, "codec": self.peer.codec if self.peer else None,
            "frame": self.last.index if self.last else -1,
            "queue_depth": self.queue.depth, "age_s": round(time.monotonic() - self._created, 3),
            "first_frame_ms": round(1000 * self._first_frame_s, 1) if self._first_frame_s is not None else None,
            "chunk_latency_ms": round(1000 * sum(self._latency) / len(self._latency), 2) if self._latency else None,
            "frames": dict(self._counts), "stalls": self._stalls,
            "recording": self.recording.describe() if self.recording is not None else None,
            "publication": self.publication.describe() if self.publication is not None else None,
            "video_input": self.video.describe() if self.video is not None else None,
            "avatar": self.avatar.describe() if self.avatar is not None else None,
        }

    async def close(self, reason: str) -> None:
        """Stop generation, drop the peer, free the backend stream; idempotent."""
        if self.state == "closed":
            return
        self.state, self.deadline = "closed", None
        self._on_closed(self)
        self._metrics.inc("streamgen_sessions_closed_total", reason=reason)
        self.queue.close()
        if self.avatar is not None:
            self.avatar.close()
        self.stop_recording()
        self.stop_publishing()
        stopped = self._handle.stop() if self._handle is not None else None
        peer, self.peer = self.peer, None
        if peer is not None:
            await peer.close()
        if stopped is not None:
            try:
                await asyncio.wait_for(asyncio.wrap_future(stopped), 30.0)
            except asyncio.TimeoutError:
                log.warning("session %s: its chunk still computing after 30 s; closing its stream anyway", self.id)
        self._backend.close(self.stream)
        log.info("session %s closed (%s)", self.id, reason)
