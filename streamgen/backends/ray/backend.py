"""`RayBackend`: the backend seam (`open` / `close` / `stats`) on a Ray cluster, in two modes.

- `tpp` — timestep pipeline parallelism: each stream's denoising steps are split across stage
  actors (`pipeline.py`); several streams share a pipeline and are batched per tick; `replicas`
  pipelines, each in its own placement group, streams placed on the least-loaded one.
- `placement` — whole streams (exact semantics) on worker actors (`placement.py`), least-loaded
  with a memory budget; `drain(worker)` moves a worker's streams elsewhere.

Both recover from a dead actor by replacing it and rebuilding the streams' caches from recent
latents the driver keeps; the next chunk reports the stall (`chunk.stall`, `stream.stalls`).
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from ..base import Backend, CapacityError
from .cluster import connect
from .pipeline import Pipeline
from .pipeline_config import PipelineConfig
from .pipeline_stream import PipelineFrameStream
from .placement import PlacedFrameStream, Placement, PlacementConfig

MODES = ("tpp", "placement")


class RayBackend(Backend):
    """Frame streams on Ray actors. The driver keeps the bundle's text encoder (prompts are encoded
    once, here) and, in tpp mode, each stream's `Stream` (timeline, controls, acks, noise)."""

    name = "ray"

    def __init__(self, bundle, mode: str = "tpp", *, stages: int | None = None, workers: int | None = None,
                 replicas: int = 1, address: str | None = "auto", pipeline: PipelineConfig | None = None,
                 placement: PlacementConfig | None = None, **connect_kwargs: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ray backend mode {mode!r}; known: {', '.join(MODES)}")
        self.bundle, self.mode = bundle, mode
        self.cluster = connect(address, **connect_kwargs)
        self._lock = threading.Lock()
        self._open: dict[int, Any] = {}
        self.pipelines: list[Pipeline] = []
        self.placement: Placement | None = None
        if mode == "tpp":
            cfg = pipeline or PipelineConfig(model=bundle.spec or bundle.name)
            if stages is not None:
                cfg = replace(cfg, stages=stages)
            try:
                for r in range(replicas):
                    self.pipelines.append(Pipeline(replace(cfg, name=cfg.name or f"tpp{r}"), bundle.dit.cfg))
            except Exception:
                self.shutdown()
                raise
        else:
            cfg = placement or PlacementConfig(model=bundle.spec or bundle.name)
            if workers is not None:
                cfg = replace(cfg, workers=workers)
            self.placement = Placement(cfg, bundle)

    def open(self, prompt: str, overrides: dict[str, Any] | None = None):
        if self.mode == "placement":
            assert self.placement is not None
            stream = self.placement.open(prompt, overrides)
        else:
            reasons = []
            for p in sorted(self.pipelines, key=lambda p: p.load()):
                try:
                    stream = PipelineFrameStream(p, self.bundle, prompt, overrides)
                    break
                except CapacityError as exc:
                    reasons.append(str(exc))
            else:
                raise CapacityError("; ".join(reasons) or "no pipeline")
        with self._lock:
            self._open[id(stream)] = stream
        return stream

    def close(self, stream) -> None:
        with self._lock:
            self._open.pop(id(stream), None)
        if isinstance(stream, (PipelineFrameStream, PlacedFrameStream)):
            stream.close()

    def drain(self, worker: int, remove: bool = False) -> list[str]:
        """Placement mode: move every stream off `worker` (rebuilt elsewhere); returns their ids."""
        if self.placement is None:
            raise ValueError("drain moves whole streams: it needs mode 'placement'")
        return self.placement.drain(worker, remove)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            streams = len(self._open)
        out: dict[str, Any] = {"backend": self.name, "mode": self.mode, "model": self.bundle.name, "streams": streams}
        if self.mode == "tpp":
            out["pipelines"] = [p.stats() for p in self.pipelines]
            out["capacity"] = sum(p.cfg.max_sessions for p in self.pipelines)
        else:
            assert self.placement is not None
            out.update(self.placement.stats())
            out["streams"] = streams
        return out

    def shutdown(self) -> None:
        """Kill this backend's actors and placement groups (the Ray session itself stays)."""
        for p in self.pipelines:
            p.shutdown()
        if self.placement is not None:
            self.placement.shutdown()
