"""Where benchmark figures go: one JSON file per run under bench-results/ (or a path the user gives)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def save_result(result: dict[str, Any], out: Path | None, stem: str) -> Path:
    """Write `result` to `out`, or to bench-results/<stem>-<timestamp>.json; returns the path."""
    path = out or Path("bench-results") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def parse_hw(text: str) -> tuple[int, int]:
    """'HxW' → (H, W) for --latent options (argparse type)."""
    import argparse

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from exc
    return h, w
