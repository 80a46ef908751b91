"""Shared test fixtures: the tiny DiT of the golden fixtures, a text encoder for it, a local Ray cluster, and a
guard against tracebacks in the log."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamgen.bundles.bundle import ModelBundle, load_bundle
from streamgen.models.dit import WanDiT
from streamgen.models.random_text import RandomTextEncoder
from streamgen.parity.common import Fixture

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def tiny_model() -> WanDiT:
    """The re-randomised 2-layer Wan DiT the golden fixtures were made with (8×8 latents → 16 tokens/frame)."""
    return Fixture.open(FIXTURES / "dit").build_model()


@pytest.fixture(scope="session")
def text_encoder() -> RandomTextEncoder:
    return RandomTextEncoder(text_len=16, text_dim=32)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are latency-bound: one torch thread is fastest and immune to other load on the box
    (and equals what stage/worker actors run with, which makes distributed results bit-identical)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_bundle() -> ModelBundle:
    return load_bundle("tiny-random")


@pytest.fixture(scope="module")
def ray_cluster(one_thread, tmp_path_factory):
    """A real local Ray cluster for one test module (ecosystem.md §2: capped object store, no dashboard).

    The head is started by `ray start` in a process of its own and this one joins it: `ray.init()` starting
    the head here would fork this many-threaded test process with a Python `preexec_fn` (Ray's), which can
    deadlock in the child when another thread holds a lock at the fork (seen in a full run)."""
    import ray

    port = _free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*command, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    f"--object-store-memory={256 * 1024**2}", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=180, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        subprocess.run([*command, "stop", "--force"], capture_output=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address(ray_cluster) -> str:
    """The GCS address of the fixture's cluster: what `--ray-address` joins."""
    import ray

    return ray.get_runtime_context().gcs_address


class Tracebacks(logging.Handler):
    """Every log record that carries a traceback or is an error."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


@pytest.fixture
def tracebacks():
    """Fails the test if anything logged a traceback or an error meanwhile (client input must not)."""
    handler = Tracebacks()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    assert not handler.records, [f"{r.name}: {r.getMessage()}" for r in handler.records[:5]]
