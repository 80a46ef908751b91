"""The public entry point, and the README's engine example run exactly as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

import streamgen

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_engine_example_runs_as_written() -> None:
    section = README.read_text().split("## The engine", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (The engine)", "exec"), {})


def test_open_stream_is_the_stream_of_its_bundle_and_closes_its_backend() -> None:
    with streamgen.open_stream("tiny-random", "a red circle", seed=3) as stream:
        got = torch.cat([stream.next().latents for _ in range(3)], dim=1)
        backend = stream.backend
        assert backend.stats()["streams"] == 1
    assert backend.stats()["streams"] == 0 and stream.closed
    from streamgen.bundles.bundle import load_bundle
    from streamgen.engine.frame_stream import FrameStream

    ref = FrameStream(load_bundle("tiny-random"), "a red circle", {"seed": 3})
    assert torch.equal(got, torch.cat([ref.next().latents for _ in range(3)], dim=1))


def test_import_streamgen_and_the_cli_parser_stay_light() -> None:
    """`import streamgen` and building the whole CLI parser import neither torch nor ray (commands start fast)."""
    code = ("import sys, streamgen; from streamgen.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'ray') if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
