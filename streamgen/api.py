"""The public entry point: `streamgen.open_stream(model, prompt, backend=...)` → chunks of frames.

    with streamgen.open_stream("embedded", "a red circle moving left") as stream:
        for chunk in stream:            # FrameChunk: frames uint8 [N, H, W, 3], latents, acks
            ...

The stream owns its backend: closing one (or leaving the `with`) frees both.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .backends.base import Backend
from .engine.frame_stream import FrameChunk, FrameStream
from .engine.prompts import Transition
from .engine.stream import Tag


class OpenStream:
    """A `FrameStream` of its own backend: iterate for chunks, steer it live, close it."""

    def __init__(self, backend: Backend, stream: FrameStream) -> None:
        self.backend, self.stream = backend, stream
        self.fps = stream.fps
        self.closed = False

    def __iter__(self) -> Iterator[FrameChunk]:
        while not self.closed:
            yield self.next()

    def next(self) -> FrameChunk:
        if self.closed:
            raise RuntimeError("the stream is closed")
        return self.stream.next()

    def set_prompt(self, prompt: str, transition: Transition | None = None, tag: Tag = None) -> None:
        self.stream.set_prompt(prompt, transition, tag=tag)

    def set_params(self, tag: Tag = None, **params: Any) -> None:
        self.stream.set_params(tag, **params)

    def reset(self, tag: Tag = None) -> None:
        self.stream.reset(tag)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.backend.close(self.stream)
            self.backend.shutdown()

    def __enter__(self) -> OpenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stream(model: str = "embedded", prompt: str | None = None, *, backend: str = "local",
                model_dir: str | None = None, dtype: str = "auto", quant: str = "none", **settings: Any) -> OpenStream:
    """A live stream of `model` (a built-in bundle or a model family with `model_dir`) on `backend`
    (local, or ray with `ray_*` settings as `make_backend` takes them); `settings` also takes StreamConfig
    overrides (seed, steps, policy, schedule, ...). `prompt` defaults to the model's example prompt."""
    from .backends.ray.cluster import make_backend
    from .bundles.bundle import load_bundle

    ray = {k: settings.pop(k) for k in list(settings) if k.startswith("ray_")}
    bundle = load_bundle(model, model_dir, dtype=dtype, quant=quant)
    chosen = make_backend(bundle, backend, max_streams=1, **ray)
    try:
        stream = chosen.open(prompt or bundle.example_prompt, settings)
    except BaseException:
        chosen.shutdown()
        raise
    return OpenStream(chosen, stream)
