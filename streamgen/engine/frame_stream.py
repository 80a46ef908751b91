"""`FrameStream`: a `Stream` plus its decoder — what a backend runs for one session or render job.

Acks and frame indices are in video frames here (the decoder maps latent frames to video frames).
Controls may be called from another thread than `next()`; the stream applies them at its next chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from .prompts import Transition
from .stream import Ack, Stream


@dataclass
class FrameChunk:
    """Decoded frames uint8 [N, H, W, 3] of one chunk; `first_frame` is the video index of frames[0]."""

    index: int
    first_frame: int
    frames: Tensor
    latents: Tensor
    acks: list[Ack] = field(default_factory=list)
    stall: dict[str, Any] | None = None  # set by backends that recovered from a fault before this chunk


class FrameStream:
    """Generates and decodes chunk after chunk; batch 1 (one viewer per stream)."""

    def __init__(self, bundle, prompt: str | Tensor, overrides: dict[str, Any] | None = None) -> None:
        self.bundle = bundle
        config = replace(bundle.stream, **(overrides or {}))
        self.stream = Stream(bundle.dit, bundle.text_encoder, config, prompt)
        self.decoder = bundle.decoder()
        self.fps = bundle.fps

    def next(self) -> FrameChunk:
        chunk = self.stream.next_chunk()
        if any(a.of == "reset" for a in chunk.acks):
            self.decoder.reset()
        frames = self.decoder.push(chunk.latents)[0]
        video = self.decoder.video_frame
        acks = [replace(a, frame=video(a.frame)) for a in chunk.acks]
        return FrameChunk(chunk.index, video(chunk.first_frame), frames, chunk.latents, acks)

    def set_prompt(self, prompt: str, transition: Transition | None = None, at_frame: int | None = None) -> None:
        """`at_frame` is a latent frame (timelines); None = the next chunk boundary."""
        self.stream.set_prompt(prompt, transition, at_frame)

    def set_params(self, **params: Any) -> None:
        self.stream.set_params(**params)

    def reset(self) -> None:
        self.stream.reset()
