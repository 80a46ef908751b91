"""Checkpoints of a render job: the whole in-process stream state, so a resumed job is bit-exact.

`backends/ray/placement.py`'s capture/restore moves a stream *without* its caches and rebuilds them
by a re-cache pass, which its `rebuild.py` documents as coherent but not bit-identical (the sink's
history is lost). A render job must equal an uninterrupted render bit for bit, so a checkpoint keeps
everything instead: the `Stream` (KV caches and policy state, prompt timeline and queued timeline
switches, chunk counter = the counter-based noise's position, execution state of any schedule) and
the decoder's streaming state, pickled with the bundle's weights replaced by references (the model
is loaded again by the process that resumes), plus the job's own bookkeeping (frames committed and
the committed segments, which hold the video and the latents so far: see `segments.py`).

Checkpoints are written to a temporary file, fsynced and renamed over the previous one, so a crash
leaves either the old or the new checkpoint, never a torn one. They are pickles: they are read only
from the server's own jobs dir, never from a client.
"""
from __future__ import annotations

import io
import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..engine.frame_stream import FrameStream

FORMAT = "streamgen-job-checkpoint-v1"
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


@dataclass
class Checkpoint:
    """A job at a chunk boundary: every frame < `frames` is in the committed `segments`."""

    spec: str  # the job's canonical spec: a checkpoint of another spec is never resumed
    chunks: int
    frames: int
    segments: list[str]  # stems, in order
    stream: bytes  # `capture`'s pickle of (Stream, decoder)


def shared_objects(bundle) -> dict[str, Any]:
    """The objects a stream shares with its bundle (weights), by stable names: what is referenced, not saved."""
    found: dict[str, Any] = {"bundle": bundle, "dit": bundle.dit, "text": bundle.text_encoder}
    seen: set[int] = set()

    def walk(obj: Any, path: str, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            found[path] = obj
            return
        for key, value in sorted(getattr(obj, "__dict__", {}).items()):
            walk(value, f"{path}.{key}", depth + 1)

    walk(bundle.decoder(), "decoder", 0)  # e.g. the VAE a streaming decoder wraps
    return found


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, shared: dict[int, str]) -> None:
        super().__init__(file, protocol=5)
        self.shared = shared

    def persistent_id(self, obj: Any) -> str | None:
        if id(obj) in self.shared:
            return self.shared[id(obj)]
        if isinstance(obj, _LOCK_TYPES):
            return "lock"
        if isinstance(obj, nn.Module):
            raise TypeError(f"stream state holds a {type(obj).__name__} that is not the bundle's: cannot checkpoint it")
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, shared: dict[str, Any]) -> None:
        super().__init__(file)
        self.shared = shared

    def persistent_load(self, pid: str) -> Any:
        if pid == "lock":
            return threading.Lock()
        return self.shared[pid]


def capture(fs: FrameStream) -> bytes:
    """The stream's and its decoder's state, the bundle's objects by reference."""
    buf = io.BytesIO()
    _Pickler(buf, {id(v): k for k, v in shared_objects(fs.bundle).items()}).dump((fs.stream, fs.decoder))
    return buf.getvalue()


def restore(fs: FrameStream, state: bytes) -> None:
    """Put `fs` (opened on the same bundle) where `capture` left its stream."""
    fs.stream, fs.decoder = _Unpickler(io.BytesIO(state), shared_objects(fs.bundle)).load()


def save(path: Path, checkpoint: Checkpoint) -> int:
    """Atomically replace `path`; returns the bytes written."""
    data = pickle.dumps({"format": FORMAT, "checkpoint": checkpoint}, protocol=5)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(data)


def load(path: Path) -> Checkpoint | None:
    """The checkpoint at `path`, or None when there is none (a job that never reached one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    content = pickle.loads(data)
    if content.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return content["checkpoint"]
