"""Avatar sessions (a model whose bundle has `avatar`, e.g. `embedded-avatar`): the reference picture, opening
an audio-driven stream on the backend, and what the session holds of its audio.

- The reference: the offer's `reference`, a `data:image/png;base64,…` (or JPEG) URL of at most 4 MB
  (`streamgen.images`); without one, `default_reference()`: a white disc on black (128×128), which the
  embedded avatar reads as a white round face. A picture that cannot be decoded, or shows no face, is a 400.
- The audio: a `TimedAudioBuffer` of AUDIO_CAPACITY_S at the model's rate, pushed by one source at a time
  (the agent's WebSocket, `audio_push.py`, or the viewer's microphone, `audio_in.py`). Audio faster than
  real time waits there; past the bound a push is refused whole (AudioOverflowError); audio that has not
  arrived when a chunk starts is silence (the avatar idles), so video never waits for audio.
- A clear (an interruption) drops the buffered audio, the frames queued for the viewer and a chunk still
  computing that spoke audio from before the clear, so what the viewer sees stops speaking at the next chunk.
- A/V latency: for each frame sent, the time from its last real sample arriving to the frame being sent.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from aiortc.sdp import SessionDescription

from ..backends import Backend
from ..engine.driven import use_drive
from ..engine.frame_stream import FrameChunk, FrameStream
from ..errors import InputError
from ..images import DEFAULT_REFERENCE, default_reference, image_from_data_url
from .audio_buffer import TimedAudioBuffer
from .frames import Frame, FrameAudio, FrameQueue

if TYPE_CHECKING:
    from ..bundles.bundle import ModelBundle

AUDIO_CAPACITY_S = 30.0
RECENT_FRAMES = 64  # the frames `stats` summarises


class PlaybackListener(Protocol):
    """Who hears how far the pushed audio has been shown (the agent's WebSocket)."""

    def played(self, position: int) -> None:
        """Every sample before `position` (in the session's pushed audio) has been shown."""

    def closed(self) -> None:
        """The session ended."""


class SessionAvatar:
    """An avatar session's audio side: the buffer, its one source, playback position and A/V latency."""

    def __init__(self, audio: TimedAudioBuffer, reference: str) -> None:
        self.audio = audio
        self.reference = reference
        self.source: str | None = None  # "websocket" | "microphone" while one pushes
        self._owner: object | None = None
        self.listener: PlaybackListener | None = None
        self.microphone: dict[str, int] | None = None  # a viewer's microphone: frames in, refused, skipped, overflow
        self.played = 0  # pushed-audio position shown so far
        self.latency_log: deque[float] = deque(maxlen=100_000)  # every frame's A/V latency (s): stats, `bench avatar`
        self._lock = threading.Lock()  # a clear and the delivery of a chunk exclude each other

    # --- sources (event loop) ----------------------------------------------------------------------
    def claim(self, owner: object, source: str, listener: PlaybackListener | None = None) -> bool:
        """Make `owner` (a socket, a microphone track) the session's audio source, of kind `source`, unless
        another one is; True when `owner` holds it."""
        if self._owner not in (None, owner):
            return False
        self._owner, self.source, self.listener = owner, source, listener
        return True

    def holds(self, owner: object) -> bool:
        return self._owner is owner

    def release(self, owner: object) -> None:
        if self._owner is owner:
            self._owner, self.source, self.listener = None, None, None

    def clear(self, queue: FrameQueue) -> int:
        """Interrupt: drop the buffered audio and the queued frames; returns how many frames."""
        with self._lock:
            self.audio.clear()
            return queue.flush()

    # --- generation thread -----------------------------------------------------------------------------
    def put(self, queue: FrameQueue, chunk: FrameChunk, frames: list[Frame]) -> int:
        """Queue a chunk's frames with their audio; returns how many were withheld because a clear came after
        the chunk took speech from the buffer."""
        take = self.audio.taken()
        if take is None or chunk.audio is None:
            raise RuntimeError("an avatar chunk without its audio take: the stream is not audio-driven")
        samples = chunk.audio.numpy().reshape(len(frames), -1)
        with self._lock:
            if take.real and take.clears < self.audio.clears:
                return len(frames)
            queue.put([Frame(f.index, f.image, f.born, FrameAudio(s, end, heard))
                       for f, s, (end, heard) in zip(frames, samples, take.frames, strict=True)])
        return 0

    # --- track callback (event loop) ---------------------------------------------------------------------
    def shown(self, frame: Frame) -> None:
        """A new frame was sent: its audio has been shown."""
        if frame.sound is None:
            return
        if frame.sound.heard is not None:
            self.latency_log.append(time.monotonic() - frame.sound.heard)
        if frame.sound.end > self.played:
            self.played = frame.sound.end
            if self.listener is not None:
                self.listener.played(self.played)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.closed()
        self._owner, self.source, self.listener = None, None, None

    # --- reporting -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The buffer's counters (seconds), `av_latency_ms`: the median over the last 64 frames sent that carried
        real audio (audio pushed ahead of real time counts its wait), and `av_latency_min_ms`, their least: the
        pipeline's own delay, what audio that arrives just in time waits (both None before any)."""
        ms = sorted(itertools.islice(reversed(self.latency_log), RECENT_FRAMES))
        return {**self.audio.describe(), "source": self.source, "played_s": round(self.played / self.audio.sample_rate, 3),
                "av_latency_ms": round(1000 * float(np.median(ms)), 1) if ms else None,
                "av_latency_min_ms": round(1000 * ms[0], 1) if ms else None}

    def describe(self) -> dict[str, Any]:
        return {**self.stats(), "reference": self.reference, "capacity_s": self.audio.capacity / self.audio.sample_rate,
                "microphone": dict(self.microphone) if self.microphone is not None else None}


def reference_problem(bundle: ModelBundle, reference: str | None, video: bool) -> str | None:
    """Why this offer's reference / video input does not fit the server's model, or None."""
    if bundle.avatar is None:
        if reference is not None:
            return (f"the model {bundle.name!r} is not audio-driven and takes no reference picture: "
                    "leave out 'reference' (it is for avatar models such as embedded-avatar)")
        return None
    if video:
        return f"the avatar model {bundle.name!r} is driven by audio and takes no video input: leave out 'video'"
    return None


def audio_problem(bundle: ModelBundle, sdp: str) -> str | None:
    """Why a POST /offer's audio does not fit a model that is not audio-driven (None: it fits): it may receive
    audio (answered inactive) but not send any, which would be ignored. (WHIP keeps its own rule: a camera's
    audio is answered inactive.)"""
    if bundle.avatar is not None:
        return None
    media = SessionDescription.parse(sdp).media
    if not any(m.kind == "audio" and m.direction in (None, "sendrecv", "sendonly") for m in media):
        return None
    return (f"the model {bundle.name!r} is not audio-driven and takes no audio: offer audio only to avatar models, "
            "or make it recvonly")


def open_avatar_stream(backend: Backend, prompt: str, overrides: dict[str, Any],
                       reference: str | None) -> tuple[FrameStream, SessionAvatar]:
    """A new audio-driven stream of `backend` (blocking: decodes the picture; run it off the event loop).
    InputError for a bad picture or a backend that cannot, CapacityError when full; nothing stays open on error."""
    model = backend.bundle.avatar
    if backend.name != "local":
        raise InputError(f"avatar sessions run on the local backend (this server: {backend.name})")
    picture = default_reference() if reference is None else image_from_data_url(reference)
    audio = TimedAudioBuffer(model.sample_rate, round(AUDIO_CAPACITY_S * model.sample_rate), model.samples_per_frame)
    stream = backend.open(prompt, overrides)
    try:
        use_drive(stream.stream, audio, model, picture)
    except BaseException:
        backend.close(stream)
        raise
    described = f"default: {DEFAULT_REFERENCE}" if reference is None else f"given: {picture.shape[1]}×{picture.shape[0]} px"
    return stream, SessionAvatar(audio, described)
