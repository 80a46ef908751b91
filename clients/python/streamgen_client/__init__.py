"""Python client for `streamgen serve`: connect, receive frames, send prompts, await acks, record MP4."""
from .client import ControlError, ReceivedFrame, ServerError, StreamClient
from .recorder import Recorder

__all__ = ["ControlError", "ReceivedFrame", "Recorder", "ServerError", "StreamClient"]
