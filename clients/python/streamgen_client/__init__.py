"""Python client for `streamgen serve`: connect, receive frames, send prompts, await acks, record MP4; drive an
avatar model with a speech file and a face picture."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import ControlError, ReceivedFrame, ServerError, StreamClient
    from .media import MediaFileError, SpeechTrack
    from .recorder import Recorder

__all__ = ["ControlError", "MediaFileError", "ReceivedFrame", "Recorder", "ServerError", "SpeechTrack", "StreamClient"]
_MODULES = {"ControlError": "client", "ReceivedFrame": "client", "ServerError": "client", "StreamClient": "client",
            "MediaFileError": "media", "SpeechTrack": "media", "Recorder": "recorder"}


def __getattr__(name: str) -> Any:
    """Imported on first use: `streamgen`'s parser adds the client's arguments (streamgen_client.cli) without
    loading aiortc, aiohttp and av."""
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
