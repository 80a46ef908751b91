"""Control-channel messages → session changes, and the reply each one gets.

Every message gets exactly one answer: an `ack` (immediately for pause/resume, at the chunk boundary
where the change lands for prompt/params/reset) or an `error` with one readable line. Bad input never
closes the channel.
"""
from __future__ import annotations

from pydantic import ValidationError

from ..errors import InputError
from .errors import describe
from .limits import RateLimiter
from .metrics import Metrics
from .protocol import (
    MAX_MESSAGE_BYTES,
    AckMessage,
    Error,
    ParamsMessage,
    PauseMessage,
    PromptMessage,
    ResetMessage,
    ResumeMessage,
    load_json,
    parse_client_message,
)
from .session import Session

MESSAGES = {"prompt": PromptMessage, "params": ParamsMessage, "pause": PauseMessage, "resume": ResumeMessage,
            "reset": ResetMessage}


class ControlHandler:
    """One per connection; messages are handled one at a time, in arrival order."""

    def __init__(self, session: Session, rate: float, metrics: Metrics) -> None:
        self.session = session
        self.limiter = RateLimiter(rate)
        self.metrics = metrics

    async def handle(self, raw: str | bytes) -> AckMessage | Error | None:
        """The immediate reply (None when the ack follows at the next chunk boundary)."""
        kind, msg_id = _peek(raw)
        if not self.limiter.allow():
            self.metrics.inc("streamgen_control_messages_total", result="rate_limited")
            return Error(message=f"rate limit: at most {self.limiter.rate:g} control messages per second; message ignored",
                         of=kind, id=msg_id)
        reply = await self._handle(raw, kind, msg_id)
        self.metrics.inc("streamgen_control_messages_total", result="error" if isinstance(reply, Error) else "ok")
        return reply

    async def _handle(self, raw: str | bytes, kind: str | None, msg_id: str | int | None) -> AckMessage | Error | None:
        try:
            msg = parse_client_message(raw)
        except ValidationError as exc:
            return Error(message=describe(exc, MESSAGES), of=kind, id=msg_id)
        except InputError as exc:  # size, encoding, depth, syntax
            return Error(message=str(exc), of=kind, id=msg_id)
        try:
            return await self._apply(msg)
        except InputError as exc:  # refused by the engine (e.g. a transition the sampler cannot do)
            return Error(message=str(exc), of=msg.type, id=msg.id)

    async def _apply(self, msg) -> AckMessage | Error | None:
        session = self.session
        if isinstance(msg, PromptMessage):
            await session.set_prompt(msg.prompt, msg.transition, msg.id)
        elif isinstance(msg, ParamsMessage):
            changes = msg.params.changes()
            if not changes:
                return Error(message="params message sets nothing (known: seed, steps, transition)", of="params", id=msg.id)
            await session.set_params(changes, msg.id)
        elif isinstance(msg, ResetMessage):
            await session.reset(msg.id)
        elif isinstance(msg, PauseMessage):
            return session.pause(msg.id)
        elif isinstance(msg, ResumeMessage):
            return session.resume(msg.id)
        return None


def _peek(raw: str | bytes) -> tuple[str | None, str | int | None]:
    """Best-effort `type` and `id` of a message that may be invalid, to label its error."""
    try:
        data = load_json(raw, "message", MAX_MESSAGE_BYTES)
    except InputError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    kind, msg_id = data.get("type"), data.get("id")
    return (kind if isinstance(kind, str) and kind in MESSAGES else None,
            msg_id if isinstance(msg_id, (str, int)) and not isinstance(msg_id, bool) else None)
