"""The control protocol: JSON messages on the ordered data channel `control`, and the HTTP offer body.

Every client message may carry an `id`, echoed in its `ack` or `error`. Changes apply at the next
chunk boundary; the `ack` names the video frame where the change took effect.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

MAX_PROMPT_CHARS = 500
MAX_MESSAGE_BYTES = 4096


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | int | None = None


class TransitionSpec(BaseModel):
    """`recache` (LongLive KV re-cache) or `blend` over `chunks` chunks (linear or slerp)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["recache", "blend"] = "recache"
    chunks: int = Field(1, ge=1, le=32)
    interpolation: Literal["linear", "slerp"] = "linear"


def _prompt_text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("prompt is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt has {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
    return value


class StreamParams(BaseModel):
    """Per-stream parameters a client may set; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    steps: list[float] | None = Field(None, min_length=1, max_length=8)
    transition: TransitionSpec | None = None

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class PromptMessage(Message):
    type: Literal["prompt"]
    prompt: str
    transition: TransitionSpec | None = None
    _check = field_validator("prompt")(classmethod(lambda cls, v: _prompt_text(v)))


class ParamsMessage(Message):
    type: Literal["params"]
    params: StreamParams


class PauseMessage(Message):
    type: Literal["pause"]


class ResumeMessage(Message):
    type: Literal["resume"]


class ResetMessage(Message):
    type: Literal["reset"]


ClientMessage = Annotated[Union[PromptMessage, ParamsMessage, PauseMessage, ResumeMessage, ResetMessage], Field(discriminator="type")]
CLIENT_MESSAGE = TypeAdapter(ClientMessage)


class Ack(BaseModel):
    type: Literal["ack"] = "ack"
    of: str
    frame: int
    id: str | int | None = None
    detail: dict[str, Any] | None = None  # e.g. how a prompt was understood (words ignored)


class Stats(BaseModel):
    type: Literal["stats"] = "stats"
    fps: float
    latency_ms: float
    frame: int
    queue_depth: int
    paused: bool = False


class Stall(BaseModel):
    """The backend recovered from a fault (an actor died or hung and was replaced) before `frame`:
    the stream went on from there, `recovery_s` late; sent so a viewer knows why the picture froze."""

    type: Literal["stall"] = "stall"
    frame: int  # the first video frame after the recovery
    reason: str
    recovery_s: float
    events: int = 1  # recoveries folded into this report (several can land before one chunk)
    replaced: list[str] = Field(default_factory=list)  # actors re-created, e.g. ["stage1"], ["worker0"]


class Error(BaseModel):
    type: Literal["error"] = "error"
    message: str
    of: str | None = None
    id: str | int | None = None


class Offer(BaseModel):
    """POST /offer body; `session_id` asks to resume a session whose peer went away (grace period)."""

    model_config = ConfigDict(extra="forbid")
    sdp: str = Field(max_length=100_000)
    type: Literal["offer"]
    prompt: str | None = None
    params: StreamParams | None = None
    session_id: str | None = None
    _check = field_validator("prompt")(classmethod(lambda cls, v: v if v is None else _prompt_text(v)))


def parse_client_message(raw: str | bytes) -> PromptMessage | ParamsMessage | PauseMessage | ResumeMessage | ResetMessage:
    """Validate one data-channel message; raises ValueError with a readable reason."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return CLIENT_MESSAGE.validate_json(raw)
