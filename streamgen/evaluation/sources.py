"""Where `streamgen eval`'s streams come from: a model bundle through the real Stream API, or rendered ground
truth with the same timing rules; either way one `StreamResult` (frames, prompt per frame, chunk times) per stream."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .plan import Timeline


@dataclass
class StreamResult:
    video: Any                   # uint8 [T, 3, H, W] (numpy)
    prompts: list[str]           # prompt in force per frame (follows the stream's acks)
    chunk_wall_s: list[float]    # per-chunk wall time
    chunk_cpu_s: list[float]     # per-chunk process CPU time


class ModelSource:
    """Streams of a model bundle through `Stream.next_chunk()` and the bundle's decoder, from noise."""

    def __init__(self, bundle, name: str) -> None:
        self.bundle, self.name = bundle, name
        self.chunk_frames = bundle.stream.chunk_frames
        self.default = bundle.stream

    def stream(self, timeline: Timeline, frames: int, seed: int, overrides: dict[str, Any],
               on_chunk: Callable[[int], None] = lambda n: None) -> StreamResult:
        from dataclasses import replace

        import torch

        from ..engine.stream import Stream

        config = replace(self.bundle.stream, seed=seed, **overrides)
        stream = Stream(self.bundle.dit, self.bundle.text_encoder, config, timeline[0][1])
        for frame, prompt in timeline[1:]:
            stream.set_prompt(prompt, at_frame=frame)
        decoder = self.bundle.decoder()
        # (first frame, prompt) as acknowledged. An ack names the frame its prompt lands at; a pipelined
        # schedule (timestep-slot) acks when a chunk enters the pipeline, before that chunk comes out.
        landed = [(0, timeline[0][1])]
        out, per_frame, wall, cpu = [], [], [], []
        done = 0
        while done < frames:
            w0, c0 = time.perf_counter(), time.process_time()
            chunk = stream.next_chunk()
            pixels = decoder.push(chunk.latents)[0]            # [F, H, W, 3] uint8
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
            for ack in chunk.acks:
                if ack.of == "prompt":
                    landed.append((ack.frame, next(p for f, p in reversed(timeline) if f <= ack.frame)))
            n = min(pixels.shape[0], frames - done)
            out.append(pixels[:n])
            per_frame += [next(p for f, p in reversed(landed) if f <= t)
                          for t in range(chunk.first_frame, chunk.first_frame + n)]
            done += n
            on_chunk(n)
        video = torch.cat(out).permute(0, 3, 1, 2).numpy()
        return StreamResult(video, per_frame, wall, cpu)


class WorldSource:
    """Rendered ground truth with the stream's timing rules: a prompt queued for frame f lands at the first
    chunk boundary ≥ f, the object starts at a seeded random token. The checker must score it at 100%."""

    name = "world (ground truth)"

    def __init__(self, chunk_frames: int = 3) -> None:
        from ..engine.stream import StreamConfig

        self.chunk_frames = chunk_frames
        self.default = StreamConfig(32, 32, chunk_frames=chunk_frames)

    def stream(self, timeline: Timeline, frames: int, seed: int, overrides: dict[str, Any],
               on_chunk: Callable[[int], None] = lambda n: None) -> StreamResult:
        import numpy as np

        from ..world import GRID, parse_prompt, render_stream

        c = self.chunk_frames
        lands = [(-(-f // c) * c, p) for f, p in timeline]
        texts = [next(p for f, p in reversed(lands) if f <= t) for t in range(frames)]
        rng = np.random.default_rng(seed)
        row, col = (int(v) for v in rng.integers(GRID, size=2))
        video, _ = render_stream([parse_prompt(t).prompt for t in texts], row, col, dtype=np.uint8)
        chunks = -(-frames // c)
        for i in range(chunks):
            on_chunk(min(c, frames - i * c))
        return StreamResult(video, texts, [0.0] * chunks, [0.0] * chunks)


__all__ = ["ModelSource", "StreamResult", "WorldSource"]
