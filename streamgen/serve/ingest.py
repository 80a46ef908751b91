"""A session's video input (video-to-video): the offer check, opening a V2V stream on the backend, and the
client's camera track → the session's bounded input buffer (`engine.v2v.LiveFrames`).

The client sends its camera on the offer's one video section, `sendrecv`, and receives the generated
video back on the same section (WHIP, and `POST /offer` with `video`). Decoded camera frames are fitted to
the model's frame size as they arrive (PyAV swscale: a centred crop, area filter) and queued; each
chunk takes its frames when it starts, never waiting (see `LiveFrames`). Audio, if offered, is answered
`inactive`: the model takes video only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from ..backends import Backend
from ..bundles.frame_encoders import PixelFrameEncoder, frame_encoder
from ..engine.frame_stream import FrameStream
from ..engine.v2v import LiveFrames, check_strength, use_video
from ..errors import InputError

log = logging.getLogger(__name__)

INPUT_CAPACITY = 64  # camera frames kept between two chunks (8 s at 8 fps; more is skipped, oldest first)


@dataclass
class SessionVideo:
    """What a V2V session holds of its input: the buffer, the model's frame fitting, the strength."""

    frames: LiveFrames
    encoder: PixelFrameEncoder
    strength: float

    def describe(self) -> dict[str, Any]:
        return {"strength": self.strength, **self.frames.describe()}


def video_problem(sdp: str) -> str | None:
    """Why this (already well-formed) offer cannot carry video input, or None: exactly one video section,
    sendrecv (the camera in, the generated video back), at most one audio section."""
    media = SessionDescription.parse(sdp).media
    videos = [m for m in media if m.kind == "video"]
    if len(videos) != 1:
        return (f"the offer has {len(videos)} video sections: video input takes exactly one, sendrecv (the camera "
                "in, the generated video back on it)")
    direction = videos[0].direction or "sendrecv"  # SDP's default
    if direction != "sendrecv":
        return (f"the offer's video is {direction}: video input needs it sendrecv (the client sends its camera and "
                "receives the generated video on the same section)")
    if sum(m.kind == "audio" for m in media) > 1:
        return "the offer has more than one audio section: at most one audio and one video track"
    return None


def open_video_stream(backend: Backend, prompt: str, overrides: dict[str, Any],
                      strength: float) -> tuple[FrameStream, SessionVideo]:
    """A new stream of `backend` that takes its chunks' starting latents from a live input buffer (blocking:
    run it off the event loop). InputError when the model or backend cannot, CapacityError when full."""
    if backend.name != "local":
        raise InputError(f"video input runs on the local backend (this server: {backend.name})")
    encoder = frame_encoder(backend.bundle)
    check_strength(strength)
    stream = backend.open(prompt, overrides)
    try:
        frames = LiveFrames(encoder.height, encoder.width, INPUT_CAPACITY)
        use_video(stream.stream, frames, encoder, strength)
    except BaseException:
        backend.close(stream)
        raise
    return stream, SessionVideo(frames, encoder, strength)


async def receive(track: MediaStreamTrack, video: SessionVideo, sid: str) -> None:
    """Feed the session's input buffer with the client's camera until the track ends."""
    received = 0
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            log.info("session %s: video input ended after %d frames", sid, received)
            return
        try:
            video.frames.push(video.encoder.fit(frame))
        except Exception as exc:  # one odd frame costs that frame, not the input
            log.warning("session %s: input frame %d dropped: %s: %s", sid, received, type(exc).__name__, exc)
        received += 1
