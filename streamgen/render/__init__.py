"""Render jobs: a prompt or a prompt timeline → an H.264 MP4 and/or the latents (`streamgen render`).

- `timeline.py` — timeline files (JSON / YAML) with line numbers in every error
- `job.py` — `RenderJob` + `run_job(job, backend, progress=cb) -> RenderResult` (no CLI, for queues)
- `writer.py` — scaling, the MP4 writer (PyAV / libx264) and the latents file
- `cli.py` — `add_render_parser(subparsers)` for the `streamgen` command

Importing this package imports no torch (the CLI parser is built from it).
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {"RenderJob": "job", "RenderResult": "job", "run_job": "job", "TimelineEntry": "timeline",
            "TimelineError": "timeline", "load_timeline": "timeline", "parse_timeline": "timeline",
            "VideoWriter": "writer", "load_latents": "writer", "add_render_parser": "cli"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
