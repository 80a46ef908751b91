"""The Stream seam of the timestep pipeline: a driver-side `Stream` (prompt timeline, controls, acks,
noise) whose `Execution` is the pipeline, and the `FrameStream` the backends hand out. The chunks are
the in-process `timestep-slot` stream's, computed in the stage actors."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from ...engine.execution import Calls, Execution, Inputs, finished
from ...engine.frame_stream import FrameChunk, FrameStream
from ...engine.stream import Stream
from ..base import StreamFailedError
from .pipeline import Pipeline, PipelineSession


class _SamplerView:
    """What `Stream` touches of an execution's sampler: a mid-stream change of the step values."""

    def __init__(self, session: PipelineSession) -> None:
        self._session = session

    @property
    def timesteps(self) -> list[float]:
        return self._session.timesteps

    @timesteps.setter
    def timesteps(self, value: list[float]) -> None:
        self._session.timesteps = list(value)
        self._session.timesteps_dirty = True


class PipelineExecution(Execution):
    """`Execution` of a timestep-slot stream whose slots live in pipeline stages (the Stream seam).

    Like the in-process batched execution, every tick starts one chunk (so `inputs(j)` is called at
    the same points) and returns when a chunk leaves the last step.
    """

    def __init__(self, pipeline: Pipeline, stream: Stream) -> None:
        cfg = stream.config
        if cfg.sampler != "few_step" or cfg.schedule != "timestep-slot":
            raise ValueError("the timestep pipeline runs few-step streams with schedule 'timestep-slot'")
        super().__init__(stream.denoiser, [], cfg.chunk_frames)
        self.pipeline = pipeline
        self.session = pipeline.admit(cfg, list(stream.timesteps))
        self.sampler = _SamplerView(self.session)
        self.frames: dict[int, Tensor] = {}
        self._stall_seen = 0

    @property
    def kv_bytes(self) -> int:
        return sum(self.session.kv_bytes)

    def chunk(self, inputs: Inputs) -> Calls[tuple[int, Tensor]]:
        return (yield from finished(self.next_chunk(inputs)))

    def next_chunk(self, inputs: Inputs) -> tuple[int, Tensor]:
        sess = self.session
        while True:
            with sess.lock:  # after a rewind, the chunks already started are fed again first
                start = None
                if not sess.feed:
                    j = self.started
                    self.started += 1
                    start = sess.register(j, inputs(j))
            result = self.pipeline.run(sess, start)
            if result.chunk is not None:
                self.frames[result.chunk] = result.frames
                return result.chunk, result.latents

    def take_stall(self) -> dict[str, Any] | None:
        new = self.session.stalls[self._stall_seen:]
        self._stall_seen = len(self.session.stalls)
        if not new:
            return None
        return {"events": len(new), "recovery_s": sum(e["recovery_s"] for e in new), "reason": new[-1]["reason"],
                "replaced": sorted({r for e in new for r in e["replaced"]})}

    def close(self) -> None:
        self.pipeline.close_session(self.session)


class PipelineFrameStream(FrameStream):
    """A FrameStream whose chunks are computed by a timestep pipeline and decoded by its decoder actor.

    The driver-side `Stream` keeps the prompt timeline, controls, acks and noise counters unchanged;
    only its execution is remote. `stalls` counts recoveries this stream went through.
    """

    def __init__(self, pipeline: Pipeline, bundle, prompt: str | Tensor, overrides: dict[str, Any] | None = None) -> None:
        overrides = dict(overrides or {})
        if overrides.get("schedule", "timestep-slot") != "timestep-slot":
            raise ValueError("the ray 'tpp' backend runs schedule 'timestep-slot' (each stage owns denoising steps); "
                             "use mode 'placement' for exact streams")
        config = replace(bundle.stream, **{**overrides, "schedule": "timestep-slot"})
        self.bundle = bundle
        self.pipeline = pipeline
        self.execution: PipelineExecution | None = None
        self.stream = Stream(bundle.dit, bundle.text_encoder, config, prompt, execution_factory=self._execution)
        self._video = bundle.decoder().video_frame  # index mapping only; decoding happens in the decoder actor
        self.fps = bundle.fps
        self.stalls = 0
        self.closed = False

    def _execution(self, stream: Stream) -> PipelineExecution:
        if self.execution is not None:  # a reset: the old slots go, fresh ones come
            self.execution.close()
        self.execution = PipelineExecution(self.pipeline, stream)
        return self.execution

    def next(self) -> FrameChunk:
        if self.closed:
            raise StreamFailedError("stream is closed")
        chunk = self.stream.next_chunk()
        assert self.execution is not None
        frames = self.execution.frames.pop(chunk.index)
        stall = self.execution.take_stall()
        if stall:
            self.stalls += stall["events"]
        video = self._video
        acks = [replace(a, frame=video(a.frame)) for a in chunk.acks]
        return FrameChunk(chunk.index, video(chunk.first_frame), frames, chunk.latents, acks, stall)


    def close(self) -> None:
        if not self.closed and self.execution is not None:
            self.execution.close()
        self.closed = True
