"""The public entry point, and the README's engine example run exactly as written."""
from __future__ import annotations

import re
import sys
import subprocess
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
    from streamgen.engine.frame_stream import FrameStream
    from streamgen.models.bundle import load_bundle

    ref = FrameStream(load_bundle("tiny-random"), "a red circle", {"seed": 3})
    assert torch.equal(got, torch.cat([ref.next().latents for _ in range(3)], dim=1))


def test_import_streamgen_stays_light() -> None:
    code = "import sys, streamgen; assert 'torch' not in sys.modules, 'import streamgen pulled torch'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
