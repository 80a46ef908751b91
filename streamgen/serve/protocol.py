"""The control protocol: JSON messages on the ordered data channel `control`, and the HTTP offer body.

Every client message may carry an `id`, echoed in its `ack` or `error`. Changes apply at the next
chunk boundary; the `ack` names the video frame where the change took effect.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from ..bundles.family import TransitionSpec
from ..errors import InputError

MAX_PROMPT_CHARS = 500
MAX_MESSAGE_BYTES = 4096
MAX_JSON_DEPTH = 16  # the deepest valid message nests 3 levels; deeper input is refused before parsing
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: linear and fast on a picture's megabytes of base64
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deeply `text`'s arrays and objects nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def load_json(raw: str | bytes, what: str, limit: int) -> Any:
    """Parse untrusted JSON: at most `limit` bytes, valid UTF-8, nested at most MAX_JSON_DEPTH levels
    (Python's parser would recurse into a RecursionError); every failure is an InputError naming why."""
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > limit:
        raise InputError(f"{what} of {size} bytes exceeds the {limit}-byte limit")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise InputError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{what} is not valid JSON ({exc})") from None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | int | None = None


def _prompt_text(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("prompt is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt has {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
    return value


MAX_SEED = 2**53  # integers a JSON number carries exactly
MAX_TIMESTEP = 1000  # the schedule's training range: steps are in (0, 1000]
Step = Annotated[float, Field(gt=0, le=MAX_TIMESTEP, allow_inf_nan=False)]


class StreamParams(BaseModel):
    """Per-stream parameters a client may set, each in a stated range; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    steps: list[Step] | None = Field(None, min_length=1, max_length=8)
    transition: TransitionSpec | None = None

    @field_validator("steps")
    @classmethod
    def _decreasing(cls, steps: list[float] | None) -> list[float] | None:
        if steps is not None and any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must strictly decrease (e.g. [1000, 750, 500, 250]), got {steps}")
        return steps

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


class AckMessage(BaseModel):
    """The wire form of an `engine.stream.Ack` (and of pause/resume, which the session applies itself):
    `id` is the client message's own id."""

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
    avatar: dict[str, Any] | None = None  # an avatar session: its audio buffer's counters (s), av_latency_ms


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


# --- an avatar session's audio WebSocket (`audio_push.py`) ----------------------------------------------------
class AudioClear(BaseModel):
    """Barge-in (LiveKit's `lk.clear_buffer`): drop the audio not shown yet; the avatar stops speaking."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["clear"]


class AudioFlush(BaseModel):
    """The end of an utterance (LiveKit's segment end): answered with `playback_finished` once it was shown."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["flush"]


class AudioFormat(BaseModel):
    """Binary messages from now on are s16le mono at `sample_rate`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["format"]
    sample_rate: int = Field(strict=True)


AudioControl = Annotated[Union[AudioClear, AudioFlush, AudioFormat], Field(discriminator="type")]
AUDIO_CONTROL = TypeAdapter(AudioControl)


class AudioReady(BaseModel):
    """The first message on the audio WebSocket: what it takes."""

    type: Literal["ready"] = "ready"
    session_id: str
    sample_rate: int  # of the binary messages (s16le mono)
    model_sample_rate: int  # what they are resampled to
    supported_rates: list[int]
    capacity_s: float  # audio that may wait ahead of the video
    max_message_s: float


class PlaybackFinished(BaseModel):
    """A segment was shown (`position`: its length, s) or interrupted (`position`: how much of it was shown)."""

    type: Literal["playback_finished"] = "playback_finished"
    position: float
    interrupted: bool


class RecordingRequest(BaseModel):
    """POST /sessions/{id}/recording body."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["start", "stop"]


class PublishRequest(BaseModel):
    """POST /sessions/{id}/publish body: start pushing the viewer's video to `url` (rtmp[s]://…), or stop."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["start", "stop"] = "start"
    url: str | None = Field(default=None, max_length=2048)


class VideoInput(BaseModel):
    """Video-to-video: the client sends its camera on the offer's (sendrecv) video and gets the generated
    video back on it. `strength` is the noise level the input is taken to (1: pure noise, input ignored); the
    default is `streamgen.engine.v2v.DEFAULT_STRENGTH` (this module stays torch-free)."""

    model_config = ConfigDict(extra="forbid")
    strength: float = Field(0.75, gt=0, le=1, allow_inf_nan=False)


class Offer(BaseModel):
    """POST /offer body; `session_id` + `resume_token` (from the session's first answer) resume a session
    whose peer went away (grace period); `takeover` also replaces a viewer that is still connected.
    `video` makes a new session video-to-video (the offer's video must be sendrecv). `reference`: an avatar
    model's reference picture, a PNG or JPEG data URL of at most 4 MB (default: a white disc on black, see
    `serve/avatar.py`); other models refuse it."""

    model_config = ConfigDict(extra="forbid")
    sdp: str = Field(max_length=100_000)
    type: Literal["offer"]
    prompt: str | None = None
    params: StreamParams | None = None
    session_id: str | None = Field(None, max_length=64)
    resume_token: str | None = Field(None, max_length=128)
    takeover: bool = False
    video: VideoInput | None = None
    reference: str | None = None
    _check = field_validator("prompt")(classmethod(lambda cls, v: v if v is None else _prompt_text(v)))


def parse_client_message(raw: str | bytes) -> PromptMessage | ParamsMessage | PauseMessage | ResumeMessage | ResetMessage:
    """Validate one data-channel message; raises InputError (or pydantic's ValidationError) with a readable reason."""
    return CLIENT_MESSAGE.validate_python(load_json(raw, "message", MAX_MESSAGE_BYTES))
