"""Golden-fixture parity: run a fixture folder (../shared/fixtures format) and compare every output.

Each fixture kind has a runner module with `run(fixture, report)`; sizes, counts and switch points
come from the fixture's meta.json only.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .common import Fixture, Report

RUNNERS = {
    "dit": "dit",
    "longlive_lora": "lora",
    "self_forcing": "chunked",
    "longlive": "chunked",
    "reward_forcing": "chunked",
    "deep_forcing": "chunked",
    "rolling_forcing": "rolling",
    "wan_vae": "wan_vae",
    "umt5": "umt5",
    "taehv": "taehv",
    "live_avatar": "live_avatar",
}


def verify_fixture(path: str | Path, atol: float = 1e-4, rtol: float = 1e-4) -> Report:
    """Run the fixture at `path`; the report holds max |Δ| per output and the verdict."""
    fixture = Fixture.open(path)
    if fixture.kind not in RUNNERS:
        raise ValueError(f"unknown fixture kind {fixture.kind!r}; known: {', '.join(sorted(RUNNERS))}")
    try:
        runner = importlib.import_module(f"{__name__}.{RUNNERS[fixture.kind]}")
    except ModuleNotFoundError as exc:
        raise NotImplementedError(f"fixture kind {fixture.kind!r} has no runner yet ({exc.name})") from exc
    report = Report(fixture.kind, atol, rtol)
    runner.run(fixture, report)
    return report
