"""The engine loop: one scheduler per model replica runs the DiT calls of every live stream.

Each stream is a `StreamRequest` with an explicit `RequestState`. Every tick the scheduler starts a
chunk for each running request whose sink wants one (the sink paces it: just in time for playback),
gathers the next group of DiT calls of every request with a chunk in progress, runs the groups with
equal shapes as one batched forward (`BatchedAttention`: each stream keeps its own caches, policy and
positions), and sends each request its flows. A chunk whose calls are done is decoded and delivered
to its sink. Admission, pause, resume and close are events applied between ticks, so the loop's
thread is the only one that touches a stream's caches or calls the DiT — which is what
`--compile`/`--cuda-graphs` need.

`batch=False` runs each request's group as its own forward: bit for bit what the stream computes
alone. Batched, results differ only by float reassociation (≤ 5e-5).
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..models.dit import WanDiT
from ..sampling.denoiser import DiTCall, forward
from .execution import Calls
from .frame_stream import FrameChunk, FrameStream

log = logging.getLogger(__name__)


class RequestState(enum.Enum):
    WAITING = "waiting"  # admitted, applied at the next tick
    RUNNING = "running"  # chunks are started whenever its sink wants one
    PAUSED = "paused"  # no new chunk starts (a queued reset still lands, so it is acknowledged)
    FINISHED = "finished"  # closed by its owner
    FAILED = "failed"  # its chunk raised; other requests are unaffected


class ChunkSink(Protocol):
    """Where a request's chunks go; called on the engine's thread."""

    def wants_chunk(self) -> bool:
        """Whether to start the next chunk now (pacing)."""

    def deliver(self, chunk: FrameChunk, seconds: float) -> None:
        """A finished chunk and how long it took from start to decode."""

    def fail(self, exc: BaseException) -> None:
        """The request's chunk raised: it is FAILED and gets no more calls."""


@dataclass(eq=False)
class StreamRequest:
    name: str
    stream: FrameStream
    sink: ChunkSink
    state: RequestState = RequestState.WAITING
    calls: Calls[FrameChunk] | None = None  # the chunk in progress
    group: list[DiTCall] | None = None  # its calls due in the next forward
    started: float = 0.0
    closed: Future = field(default_factory=Future)  # resolved once the engine let go of it

    @property
    def schedulable(self) -> bool:
        return self.state is RequestState.RUNNING or (self.state is RequestState.PAUSED and self.stream.reset_pending)


class Engine:
    """The scheduler and its in-process executor: one thread, one batched forward per shape per tick."""

    def __init__(self, model: WanDiT, batch: bool = True, idle_s: float = 0.05, name: str = "engine") -> None:
        self.model = model
        self.batch = batch
        self.idle_s = idle_s
        self.name = name
        self.requests: list[StreamRequest] = []
        self._events: list[tuple[str, StreamRequest]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.forwards = 0
        self.batched_calls = 0  # calls that ran in a forward with another request's

    # --- events (any thread) -----------------------------------------------------------------------
    def add(self, name: str, stream: FrameStream, sink: ChunkSink) -> StreamRequest:
        request = StreamRequest(name, stream, sink)
        self._event("add", request)
        return request

    def pause(self, request: StreamRequest) -> None:
        self._event("pause", request)

    def resume(self, request: StreamRequest) -> None:
        self._event("resume", request)

    def remove(self, request: StreamRequest) -> Future:
        """Stop scheduling `request`; the future resolves when the loop no longer touches it."""
        self._event("remove", request)
        return request.closed

    def wake(self) -> None:
        """Something changed that may make a request want a chunk (a frame was consumed, a control queued)."""
        self._wake.set()

    def _event(self, kind: str, request: StreamRequest) -> None:
        with self._lock:
            self._events.append((kind, request))
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not self.step():
                self._wake.wait(self.idle_s)
        self._apply_events()
        for request in self.requests:  # the engine is gone: nobody will touch these again
            self._release(request, RequestState.FINISHED)
        self.requests.clear()

    @torch.no_grad()
    def step(self) -> bool:
        """One tick; False when there was nothing to do."""
        self._apply_events()
        for request in self.requests:
            if request.calls is None and request.schedulable and request.sink.wants_chunk():
                request.calls, request.started = request.stream.chunk_steps(), time.perf_counter()
                self._advance(request, None)
        due = [r for r in self.requests if r.group is not None]
        if not due:
            return False
        self.ticks += 1
        for group in self._groups(due):
            for request, flows in self._run_group(group):
                self._advance(request, flows)
        return True

    def _apply_events(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        for kind, request in events:
            if kind == "add" and request.state is RequestState.WAITING:
                self.requests.append(request)
                request.state = RequestState.RUNNING
            elif kind == "pause" and request.state is RequestState.RUNNING:
                request.state = RequestState.PAUSED
            elif kind == "resume" and request.state is RequestState.PAUSED:
                request.state = RequestState.RUNNING
            elif kind == "remove":
                if request in self.requests:
                    self.requests.remove(request)
                self._release(request, RequestState.FINISHED if request.state is not RequestState.FAILED else request.state)

    def _groups(self, due: list[StreamRequest]) -> list[list[StreamRequest]]:
        """Requests whose pending calls can share one forward."""
        if not self.batch:
            return [[r] for r in due]
        groups: dict[Any, list[StreamRequest]] = {}
        for request in due:
            keys = {c.batch_key for c in request.group}
            key = keys.pop() if len(keys) == 1 else ("alone", id(request))
            groups.setdefault(key, []).append(request)
        return list(groups.values())

    def _run_group(self, requests: list[StreamRequest]) -> list[tuple[StreamRequest, list[Tensor] | BaseException]]:
        """One forward for all the requests' calls; when it fails, each request alone, so a bad one
        fails by itself."""
        calls = [c for r in requests for c in r.group]
        try:
            flows = self._forward(requests, calls)
        except Exception as exc:
            if len(requests) == 1:
                return [(requests[0], exc)]
            return [pair for r in requests for pair in self._run_group([r])]
        if len(requests) > 1:
            self.batched_calls += len(calls)
        out, i = [], 0
        for request in requests:
            n = len(request.group)
            out.append((request, flows[i:i + n]))
            i += n
        return out

    def _forward(self, requests: list[StreamRequest], calls: list[DiTCall]) -> list[Tensor]:
        flows = forward(self.model, calls)
        self.forwards += 1
        for request in requests:
            request.stream.stream.denoiser.calls += 1
        return flows

    def _advance(self, request: StreamRequest, flows: list[Tensor] | BaseException | None) -> None:
        """Send the request its flows (None: start its chunk); it yields its next group or finishes."""
        try:
            if isinstance(flows, BaseException):
                raise flows
            request.group = next(request.calls) if flows is None else request.calls.send(flows)
            return
        except StopIteration as stop:
            chunk = stop.value
        except Exception as exc:
            self._fail(request, exc)
            return
        request.calls = request.group = None
        try:
            request.sink.deliver(chunk, time.perf_counter() - request.started)
        except Exception as exc:
            self._fail(request, exc)

    def _fail(self, request: StreamRequest, exc: BaseException) -> None:
        log.warning("%s: request %s failed: %s: %s", self.name, request.name, type(exc).__name__, exc)
        request.calls = request.group = None
        request.state = RequestState.FAILED
        self.requests.remove(request)
        try:
            request.sink.fail(exc)
        finally:
            self._release(request, RequestState.FAILED)

    @staticmethod
    def _release(request: StreamRequest, state: RequestState) -> None:
        if request.calls is not None:
            request.calls.close()
        request.calls = request.group = None
        request.state = state
        if not request.closed.done():
            request.closed.set_result(state)

    def stats(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for request in list(self.requests):
            states[request.state.value] = states.get(request.state.value, 0) + 1
        return {"requests": states, "ticks": self.ticks, "forwards": self.forwards, "batched_calls": self.batched_calls,
                "batch": self.batch}
