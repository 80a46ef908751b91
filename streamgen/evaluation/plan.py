"""What `streamgen eval` streams: the policy × schedule combinations and the prompts, switch timelines and
steps each one gets, resolved from the arguments before anything is streamed."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

SWITCH_KINDS = ("colour", "shape", "direction", "all")

Timeline = list[tuple[int, str]]  # [(frame, prompt text), …] starting at frame 0


@dataclass(frozen=True)
class PolicySpec:
    """A `--policies` item: `label` as given, the policy `name` and the settings written after the colon."""

    label: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)


def parse_policy(text: str) -> PolicySpec:
    """`NAME` or `NAME:KEY=VALUE,KEY=VALUE` (values parsed as YAML: 0, true, relative, …)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"policy {text!r}: expected NAME or NAME:KEY=VALUE,…")
    settings: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"policy {text!r}: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        settings[key.strip()] = yaml.safe_load(value)
    return PolicySpec(text, name, settings)


@dataclass(frozen=True)
class Combo:
    """One policy × schedule: `overrides` are StreamConfig fields (policy, policy_settings, schedule, steps)."""

    policy: str
    sampler: str
    overrides: dict[str, Any]


def prompt_items(count: int | str, seed: int) -> list[str]:
    """'all' → the 84 prompts in index order; N → N distinct prompts drawn with `seed` (N > 84: cycled)."""
    import numpy as np

    from ..world import all_prompts

    pool = [p.text() for p in all_prompts()]
    if count == "all":
        return pool
    order = np.random.default_rng(seed).permutation(len(pool)).tolist()
    return [pool[order[i % len(pool)]] for i in range(int(count))]


def switch_frame(frames: int, chunk_frames: int) -> int:
    """The chunk boundary nearest the middle, at least one chunk in."""
    return max(chunk_frames, chunk_frames * round(frames / (2 * chunk_frames)))


def switch_items(count: int, frames: int, chunk_frames: int, seed: int) -> list[tuple[str, Timeline]]:
    """(kind, timeline) per switch stream: kinds cycle colour, shape, direction, all; each changed attribute
    takes a different random value; the switch is queued at `switch_frame`."""
    import numpy as np

    from ..world import COLOURS, DIRECTIONS, SHAPES, Prompt

    values = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}
    rng = np.random.default_rng([seed, 1])
    at = switch_frame(frames, chunk_frames)
    out = []
    for i in range(count):
        kind = SWITCH_KINDS[i % len(SWITCH_KINDS)]
        p = Prompt(*(vals[int(rng.integers(len(vals)))] for vals in values.values()))
        changes = {}
        for attr in (values if kind == "all" else (kind,)):
            others = [v for v in values[attr] if v != getattr(p, attr)]
            changes[attr] = others[int(rng.integers(len(others)))]
        out.append((kind, [(0, p.text()), (at, p.replace(**changes).text())]))
    return out


def steps_from_args(steps: Sequence[float] | None, default: Sequence[float]) -> tuple[float, ...]:
    """None → the model's; one integer N → N evenly spaced from 1000 (the model's own list when N matches it);
    several values → those timesteps."""
    if not steps:
        return tuple(default)
    if len(steps) > 1:
        return tuple(float(s) for s in steps)
    n = steps[0]
    if n != int(n) or n < 1:
        raise ValueError(f"--steps with one value is a step count (a positive integer), got {n:g}")
    n = int(n)
    if n == len(default):
        return tuple(default)
    return tuple(1000.0 * (1 - i / n) for i in range(n))


def resolve_policies(specs: Sequence[PolicySpec], default) -> list[tuple[PolicySpec, dict[str, Any]]]:
    """Each spec with its full settings, validated by building the policy (unknown names list the known)."""
    from ..cache.policy import make_policy

    out = []
    for spec in specs:
        settings = {**(default.policy_settings if spec.name == default.policy else {}), **spec.settings}
        try:
            make_policy(spec.name, **settings)
        except TypeError as exc:  # an unknown setting
            raise ValueError(f"policy {spec.label!r}: {exc}") from None
        except ValueError as exc:
            raise ValueError(str(exc) if "unknown cache policy" in str(exc) else f"policy {spec.label!r}: {exc}") from None
        out.append((spec, settings))
    return out


__all__ = ["SWITCH_KINDS", "Combo", "PolicySpec", "Timeline", "parse_policy", "prompt_items", "resolve_policies",
           "steps_from_args", "switch_frame", "switch_items"]
