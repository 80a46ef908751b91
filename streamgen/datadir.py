"""Where streamgen keeps what outlives a process (render jobs, recordings) unless told otherwise."""
from __future__ import annotations

import os
from pathlib import Path


def user_data_dir(name: str) -> Path:
    """$XDG_DATA_HOME/streamgen/NAME (the XDG default: ~/.local/share)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "streamgen" / name
