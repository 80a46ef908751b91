"""`FrameStream`: a `Stream` plus its decoder — what a backend runs for one session or render job.

Acks and frame indices are in video frames here (the decoder maps latent frames to video frames).
Controls may be called from another thread than `next()`; the stream applies them at its next chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from .execution import Calls
from .prompts import Transition
from .stream import Ack, Chunk, Stream, Tag


@dataclass
class FrameChunk:
    """Decoded frames uint8 [N, H, W, 3] of one chunk; `first_frame` is the video index of frames[0]."""

    index: int
    first_frame: int
    frames: Tensor
    latents: Tensor
    acks: list[Ack] = field(default_factory=list)
    stall: dict[str, Any] | None = None  # set by backends that recovered from a fault before this chunk
    audio: Tensor | None = None  # float32 samples that drove these frames (an audio-driven stream)


class FrameStream:
    """Generates and decodes chunk after chunk; batch 1 (one viewer per stream)."""

    def __init__(self, bundle, prompt: str | Tensor, overrides: dict[str, Any] | None = None) -> None:
        self.bundle = bundle
        config = replace(bundle.stream, **(overrides or {}))
        self.stream = Stream(bundle.dit, bundle.text_encoder, config, prompt)
        self.decoder = bundle.decoder()
        self.fps = bundle.fps

    def chunk_steps(self) -> Calls[FrameChunk]:
        """The next chunk as DiT calls (see `Stream.chunk_steps`), decoded once its latents are done."""
        chunk = yield from self.stream.chunk_steps()
        return self.decode(chunk)

    def next(self) -> FrameChunk:
        """The next chunk, computed alone."""
        return self.decode(self.stream.next_chunk())

    def decode(self, chunk: Chunk) -> FrameChunk:
        if any(a.of == "reset" for a in chunk.acks):
            self.decoder.reset()
        frames = self.decoder.push(chunk.latents)[0]
        video = self.decoder.video_frame
        acks = [replace(a, frame=video(a.frame)) for a in chunk.acks]
        return FrameChunk(chunk.index, video(chunk.first_frame), frames, chunk.latents, acks, audio=chunk.audio)

    @property
    def reset_pending(self) -> bool:
        return self.stream.reset_pending

    def set_prompt(self, prompt: str, transition: Transition | None = None, at_frame: int | None = None,
                   tag: Tag = None) -> None:
        """`at_frame` is a latent frame (timelines); None = the next chunk boundary."""
        self.stream.set_prompt(prompt, transition, at_frame, tag)

    def set_params(self, tag: Tag = None, **params: Any) -> None:
        self.stream.set_params(tag, **params)

    def reset(self, tag: Tag = None) -> None:
        self.stream.reset(tag)
