"""The default torch thread count: the cores idle now, so a busy core never makes the default slow."""
from __future__ import annotations

import subprocess
import sys

from streamgen.engine import threads
from streamgen.serve.config import ServeConfig


def test_busy_cores_are_not_counted() -> None:
    cores = threads.usable_cores()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
    try:
        assert threads.idle_cores(0.5) < 1.5
        assert threads.default_threads() == 1
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_without_proc_stat_every_usable_core_is_used(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(threads, "PROC_STAT", tmp_path / "missing")
    assert threads.idle_cores() is None
    cores = threads.usable_cores()
    assert threads.default_threads() == cores
    assert threads.default_threads(share=cores + 1) == 1  # never zero
    assert ServeConfig(scheduler="threads", max_sessions=cores).torch_threads() == 1
    assert ServeConfig(threads=3).torch_threads() == 3
