"""What a client submits: a render spec as JSON, checked field by field before it is queued.

The timeline goes through the render CLI's own validation (`render.timeline.parse_timeline`), so a
job is refused for exactly the reasons `streamgen render --timeline` refuses a file; every other
error names its field (`SpecError.field`, the API's 422 body). The canonical JSON of a spec
(`canonical`) is what idempotent submission compares.
"""
from __future__ import annotations

import json
import math
import re
from urllib.parse import unquote, urlsplit
from dataclasses import asdict, dataclass, field
from typing import Any

from ..render.timeline import TimelineEntry, TimelineError, parse_timeline, with_opening

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEDULES = ("exact", "timestep-slot")
MAX_SECONDS = 3600.0
FIELDS = ("id", "prompt", "timeline", "seconds", "model", "seed", "schedule", "policy", "policy_settings", "fps",
          "size", "crf", "preset", "priority", "webhook")
MAX_URL = 2048


class SpecError(ValueError):
    """A bad submission: `field` is the JSON field at fault (the 422 names it)."""

    def __init__(self, field_: str, message: str) -> None:
        self.field = field_
        super().__init__(f"{field_}: {message}")


@dataclass(frozen=True)
class JobSpec:
    """A render request, JSON-shaped (what the store keeps); `timeline` always opens at 0."""

    timeline: tuple[dict[str, Any], ...]
    seconds: float
    model: str | None = None
    seed: int | None = None
    schedule: str | None = None
    policy: str | None = None
    policy_settings: dict[str, Any] = field(default_factory=dict)
    fps: float | None = None
    size: str | None = None
    crf: int = 18
    preset: str = "medium"
    priority: int = 0
    webhook: str | None = None  # told of state changes (jobs/webhooks.py), if the server allows the URL

    def canonical(self) -> str:
        """Stable JSON of everything that fixes the output (priority included: another priority is another request)."""
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        return cls(**{**data, "timeline": tuple(data["timeline"])})

    def entries(self) -> list[TimelineEntry]:
        return parse_timeline(json.dumps(list(self.timeline)), "timeline", "json")


def _number(body: dict[str, Any], key: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise SpecError(key, f"expected {'a whole number' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise SpecError(key, f"must be within [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}], "
                             f"got {value!r}")
    return kind(value)


def _string(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise SpecError(key, f"expected a non-empty string, got {value!r}")
    return value


def check_url(url: Any) -> str:
    """A webhook URL's own shape (http/https, a host, no credentials); SpecError naming `webhook`."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise SpecError("webhook", f"expected an http(s) URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise SpecError("webhook", f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError("webhook", "expected an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise SpecError("webhook", "credentials in the URL are not accepted")
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        raise SpecError("webhook", "'.' and '..' path segments are not accepted")
    return url


def parse_spec(body: Any) -> tuple[str | None, JobSpec]:
    """(client id or None, spec) of a POST /jobs body; raises SpecError naming the field."""
    if not isinstance(body, dict):
        raise SpecError("body", "expected a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise SpecError(unknown[0], f"unknown field; known: {', '.join(FIELDS)}")
    job_id = body.get("id")
    if job_id is not None and (not isinstance(job_id, str) or not ID_PATTERN.match(job_id)):
        raise SpecError("id", f"1-64 letters, digits, '_', '-', '.' (not first), got {job_id!r}")
    timeline = body.get("timeline")
    if timeline is not None and not isinstance(timeline, list):
        raise SpecError("timeline", "expected a list of {at, prompt, transition?}")
    try:
        entries = parse_timeline(json.dumps(timeline), "timeline", "json") if timeline else []
        entries = with_opening(entries, _string(body, "prompt"), "timeline")
    except TimelineError as exc:
        raise SpecError("prompt" if exc.source == "--prompt" else "timeline", exc.reason if exc.index is None
                        else f"entry [{exc.index}]: {exc.reason}") from None
    except ValueError as exc:
        raise SpecError("prompt", str(exc).replace("--prompt or --timeline", "'prompt' or 'timeline'")) from None
    seconds = _number(body, "seconds", float, 0.0, MAX_SECONDS)
    if seconds is None or seconds <= 0:
        raise SpecError("seconds", f"required: a number of seconds in (0, {MAX_SECONDS:g}]")
    schedule = _string(body, "schedule")
    if schedule is not None and schedule not in SCHEDULES:
        raise SpecError("schedule", f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    settings = body.get("policy_settings") or {}
    if not isinstance(settings, dict):
        raise SpecError("policy_settings", "expected an object of policy settings")
    size = body.get("size")
    if size is not None:
        from ..render.writer import parse_output_size

        try:
            parse_output_size(str(size))
        except ValueError as exc:
            raise SpecError("size", str(exc)) from None
    preset = body.get("preset", "medium")
    from ..render.writer import X264_PRESETS

    if preset not in X264_PRESETS:
        raise SpecError("preset", f"unknown x264 preset {preset!r}; known: {', '.join(X264_PRESETS)}")
    crf = _number(body, "crf", int, 0, 51)
    spec = JobSpec(timeline=tuple(e.to_dict() for e in entries), seconds=seconds, model=_string(body, "model"),
                   seed=_number(body, "seed", int, 0, 2**53), schedule=schedule, policy=_string(body, "policy"),
                   policy_settings=dict(settings), fps=_number(body, "fps", float, 1e-3, 1000.0),
                   size=None if size is None else str(size), crf=18 if crf is None else crf, preset=preset,
                   priority=_number(body, "priority", int, -1000, 1000) or 0,
                   webhook=None if body.get("webhook") is None else check_url(body["webhook"]))
    return job_id, spec
