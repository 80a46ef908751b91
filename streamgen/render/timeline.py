"""Render timelines: a JSON or YAML list of ``{at: seconds, prompt, transition?}`` entries, read with
the file line of every entry (and key) so a bad entry is reported as ``FILE:LINE: entry [i]: reason``.

```yaml
- at: 0                       # the opening prompt (a timeline that starts later needs --prompt)
  prompt: a red fox running through snow
- at: 2.5
  prompt: the fox jumps
  transition: recache         # or {kind: blend, chunks: 4, interpolation: slerp}; default: the model's
```

Entries must be sorted by ``at`` (strictly increasing, seconds ≥ 0, in model time: frame i of the
render is at i / model fps). Indices in messages are list indices (0-based), lines are 1-based.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..engine.prompts import Transition

ENTRY_KEYS = ("at", "prompt", "transition")
TRANSITION_KEYS = ("kind", "chunks", "interpolation")
TRANSITION_KINDS = ("recache", "blend")
INTERPOLATIONS = ("linear", "slerp")


class TimelineError(ValueError):
    """A timeline that cannot be used; `str()` is ``FILE:LINE: entry [i]: reason``."""

    def __init__(self, reason: str, source: str = "<timeline>", line: int | None = None, index: int | None = None) -> None:
        self.reason, self.source, self.line, self.index = reason, source, line, index
        where = source + (f":{line}" if line is not None else "")
        entry = f"entry [{index}]: " if index is not None else ""
        super().__init__(f"{where}: {entry}{reason}")


@dataclass(frozen=True)
class TimelineEntry:
    """One prompt change: from `at` seconds on (model time) the render follows `prompt`.
    `transition` None = the stream's default; `line` / `index` locate it in its file for messages."""

    at: float
    prompt: str
    transition: Transition | None = None
    line: int | None = None
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "prompt": self.prompt}
        if self.transition is not None:
            t = self.transition
            out["transition"] = {"kind": t.kind, "chunks": t.chunks, "interpolation": t.interpolation}
        return out


def timeline_json(entries: list[TimelineEntry]) -> str:
    """The timeline as a JSON string (for the latents file's metadata); parses back with `parse_timeline`."""
    return json.dumps([e.to_dict() for e in entries], ensure_ascii=False)


def single_prompt(prompt: str) -> list[TimelineEntry]:
    return [TimelineEntry(0.0, prompt, None, None, None)]


# --- reading files: values plus line numbers ------------------------------------------------------
@dataclass
class _Item:
    """A list entry as read: its value, its line, and for mappings each key's line (duplicates kept apart)."""

    value: Any
    line: int
    key_lines: dict[str, int]
    duplicates: list[tuple[str, int]]


def load_timeline(path: str | Path) -> list[TimelineEntry]:
    """Read and validate a timeline file (``.json``: JSON; anything else: YAML, which also reads JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not JSON
    except FileNotFoundError:
        raise TimelineError("no such file", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TimelineError(f"cannot read: {exc}", str(path)) from None
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    return parse_timeline(text, str(path), fmt)


def parse_timeline(text: str, source: str = "<timeline>", fmt: str = "yaml") -> list[TimelineEntry]:
    """Parse timeline text (`fmt` "json" or "yaml") into validated entries; raises TimelineError."""
    if fmt not in ("json", "yaml"):
        raise ValueError(f"unknown timeline format {fmt!r}; known: json, yaml")
    items = _json_items(text, source) if fmt == "json" else _yaml_items(text, source)
    if not items:
        raise TimelineError("the timeline is empty: give at least one {at, prompt} entry", source, 1)
    entries: list[TimelineEntry] = []
    for i, item in enumerate(items):
        entry = _entry(item, i, source)
        if entries and not entry.at > entries[-1].at:
            raise TimelineError(f"at {entry.at:g} s is not after entry [{i - 1}]'s at {entries[-1].at:g} s: entries must be "
                                "sorted by 'at' (strictly increasing)", source, _key_line(item, "at"), i)
        entries.append(entry)
    return entries


def _json_items(text: str, source: str) -> list[_Item]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TimelineError(f"JSON syntax error: {exc.msg} (column {exc.colno})", source, exc.lineno) from None
    if not isinstance(data, list):
        raise TimelineError(f"the timeline must be a list of {{at, prompt, transition?}} entries, got {_kind(data)}",
                            source, _line_of(text, _skip(text, 0)))
    # The text is valid JSON with a list at the top: walk it again with raw_decode to learn where
    # each entry and each key starts (json.loads keeps no positions).
    decoder = json.JSONDecoder()
    items: list[_Item] = []
    pos = _skip(text, 0) + 1  # past '['
    for value in data:
        pos = _skip(text, pos)
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
        line = _line_of(text, pos)
        key_lines: dict[str, int] = {}
        duplicates: list[tuple[str, int]] = []
        if isinstance(value, dict):
            p = _skip(text, pos + 1)  # past '{'
            while text[p] != "}":
                if text[p] == ",":
                    p = _skip(text, p + 1)
                key_line = _line_of(text, p)
                key, p = decoder.raw_decode(text, p)
                if key in key_lines:
                    duplicates.append((key, key_line))
                else:
                    key_lines[key] = key_line
                p = _skip(text, _skip(text, p) + 1)  # past ':'
                _, p = decoder.raw_decode(text, p)
                p = _skip(text, p)
            end = p + 1
        else:
            _, end = decoder.raw_decode(text, pos)
        items.append(_Item(value, line, key_lines, duplicates))
        pos = end
    return items


_WS = re.compile(r"[ \t\n\r]*")


def _skip(text: str, pos: int) -> int:
    m = _WS.match(text, pos)
    return m.end() if m else pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _yaml_items(text: str, source: str) -> list[_Item]:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = " ".join(str(s) for s in (exc.problem, exc.context) if s) or "invalid YAML"
        where = [f"column {mark.column + 1}"] if mark else []
        if exc.context_mark is not None and mark is not None and exc.context_mark.line != mark.line:
            where.append(f"started at line {exc.context_mark.line + 1}")
        raise TimelineError(f"YAML syntax error: {reason}" + (f" ({', '.join(where)})" if where else ""),
                            source, mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise TimelineError(f"YAML error: {exc}", source) from None
    finally:
        loader.dispose()
    if root is None:
        raise TimelineError("the timeline is empty: give at least one {at, prompt} entry", source, 1)
    if not isinstance(root, yaml.SequenceNode) or not isinstance(data, list):
        raise TimelineError(f"the timeline must be a list of {{at, prompt, transition?}} entries, got {_kind(data)}",
                            source, root.start_mark.line + 1)
    items: list[_Item] = []
    for node, value in zip(root.value, data):
        key_lines: dict[str, int] = {}
        duplicates: list[tuple[str, int]] = []
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else repr(key_node.value)
                line = key_node.start_mark.line + 1
                if key in key_lines:
                    duplicates.append((key, line))
                else:
                    key_lines[key] = line
        items.append(_Item(value, node.start_mark.line + 1, key_lines, duplicates))
    return items


# --- validation -----------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), f"a {type(value).__name__} value")


def _key_line(item: _Item, key: str) -> int:
    return item.key_lines.get(key, item.line)


def _entry(item: _Item, i: int, source: str) -> TimelineEntry:
    def fail(reason: str, key: str | None = None) -> TimelineError:
        return TimelineError(reason, source, _key_line(item, key) if key else item.line, i)

    v = item.value
    if not isinstance(v, dict):
        raise fail(f"expected a mapping {{at, prompt, transition?}}, got {_kind(v)}")
    if item.duplicates:
        key, line = item.duplicates[0]
        raise TimelineError(f"duplicate key {key!r}", source, line, i)
    unknown = [k for k in v if str(k) not in ENTRY_KEYS]
    if unknown:
        raise fail(f"unknown key {str(unknown[0])!r}; known: {', '.join(ENTRY_KEYS)}", str(unknown[0]))
    for key in ("at", "prompt"):
        if key not in v:
            raise fail(f"missing {key!r}" + (" (seconds from the start)" if key == "at" else ""))
    at = v["at"]
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise fail(f"'at' must be a number of seconds, got {_kind(at)} {at!r}", "at")
    if not math.isfinite(at) or at < 0:
        raise fail(f"'at' must be a finite number ≥ 0 (seconds), got {at!r}", "at")
    prompt = v["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise fail(f"'prompt' must be a non-empty string, got {_kind(prompt)} {prompt!r}", "prompt")
    transition = _transition(v.get("transition"), lambda reason: fail(reason, "transition"))
    return TimelineEntry(float(at), prompt, transition, item.line, i)


def _transition(value: Any, fail) -> Transition | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise fail(f"'transition' must be a kind ({', '.join(TRANSITION_KINDS)}) or a mapping "
                   f"{{kind, chunks, interpolation}}, got {_kind(value)}")
    unknown = [k for k in value if str(k) not in TRANSITION_KEYS]
    if unknown:
        raise fail(f"unknown transition key {str(unknown[0])!r}; known: {', '.join(TRANSITION_KEYS)}")
    if "kind" not in value:
        raise fail(f"transition without 'kind' ({', '.join(TRANSITION_KINDS)})")
    kind, chunks, interp = value["kind"], value.get("chunks", 1), value.get("interpolation", "linear")
    if kind not in TRANSITION_KINDS:
        raise fail(f"bad transition kind {kind!r}; known: {', '.join(TRANSITION_KINDS)}")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise fail(f"transition 'chunks' must be a whole number ≥ 1, got {chunks!r}")
    if interp not in INTERPOLATIONS:
        raise fail(f"bad transition interpolation {interp!r}; known: {', '.join(INTERPOLATIONS)}")
    return Transition(kind, chunks, interp)


def with_opening(entries: list[TimelineEntry], prompt: str | None, source: str = "<timeline>") -> list[TimelineEntry]:
    """The full timeline of a render: `entries` (a file) and/or `prompt` (--prompt). A file must start
    at 0 (its first entry is the opening prompt) unless `prompt` opens the render; not both."""
    if prompt is not None and not prompt.strip():
        raise TimelineError("the prompt is empty", "--prompt")
    if not entries:
        if prompt is None:
            raise ValueError("nothing to render: give --prompt or --timeline")
        return single_prompt(prompt)
    first = entries[0]
    if first.at == 0:
        if prompt is not None:
            raise TimelineError("the timeline's first entry (at 0) and --prompt both give the opening prompt: "
                                "drop one", source, first.line, first.index)
        return list(entries)
    if prompt is None:
        raise TimelineError(f"the first entry is at {first.at:g} s: a timeline starts at 0 (its opening prompt), "
                            "or give --prompt for the start", source, first.line, first.index)
    return [TimelineEntry(0.0, prompt, None, None, None), *entries]
