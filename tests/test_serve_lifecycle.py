"""Sessions come and go without leaving anything behind: engine requests, backend streams, per-address
counters, generation threads; and the serving core's loop never blocks /health."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from .test_serve import StreamClient, run, serving, until

ROOT = Path(__file__).resolve().parents[1]


def _generation_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("generate-", "drive-"))]


def test_sessions_opened_and_dropped_leave_nothing_behind() -> None:
    async def main() -> None:
        async with serving(max_sessions=2, max_sessions_per_ip=2, grace_s=0.3, offer_rate=100.0) as server:
            engine = server.backend.engine
            warm = StreamClient(server.url, prompt="a red circle")
            await warm.connect()
            await warm.next_frame()
            await warm.close()
            assert await until(lambda: not server.manager.sessions, 10)
            threads = threading.active_count()
            for i in range(24):
                client = StreamClient(server.url, prompt=f"a red circle {i}")
                await client.connect()
                await client.next_frame()
                if i % 3 == 0:
                    await client.drop()  # the peer vanishes without DELETE: the grace period frees it
                    await client.close(delete=False)
                else:
                    await client.close()
                assert await until(lambda: len(server.manager.sessions) < 2, 10)
            assert await until(lambda: not server.manager.sessions, 10)
            assert await until(lambda: not engine.requests, 5)
            assert server.backend.stats()["streams"] == 0
            assert not server.manager._admitting  # no zero counters kept per address
            assert not _generation_threads()  # one engine thread serves every session
            assert threading.active_count() <= threads + 2, [t.name for t in threading.enumerate()]
            assert engine.stats()["ticks"] > 0

    run(main(), timeout=300)


def test_stopping_the_server_closes_every_peer_and_stream() -> None:
    async def main() -> None:
        async with serving(max_sessions=2) as server:
            clients = [StreamClient(server.url, prompt=f"a red circle {i}") for i in range(2)]
            for client in clients:
                await client.connect()
                await client.next_frame()
            peers = [session.peer.pc for session in server.manager.sessions.values()]
            backend = server.backend
            assert len(peers) == 2 and all(pc.connectionState == "connected" for pc in peers)
        assert all(pc.connectionState == "closed" for pc in peers), [pc.connectionState for pc in peers]
        assert backend.stats()["streams"] == 0 and not backend.engine.requests
        assert not _generation_threads()
        for client in clients:
            await client.close(delete=False)

    run(main(), timeout=120)


@pytest.mark.parametrize("backend, sig", [("local", signal.SIGTERM), ("ray", signal.SIGTERM), ("ray", signal.SIGINT)])
def test_a_signal_stops_the_server_cleanly(tmp_path: Path, backend: str, sig: signal.Signals) -> None:
    """SIGTERM/SIGINT: exit 0 after closing sessions and releasing the backend (ray.init installs a SIGTERM
    handler that aborts the process: the server takes the signal back once the backend is up)."""
    argv = [sys.executable, "-m", "streamgen.cli", "serve", "--port", "0", "--model", "tiny-random", "--threads", "1",
            "--jobs-dir", str(tmp_path / "jobs"), "--recordings-dir", str(tmp_path / "rec"), "--backend", backend]
    if backend == "ray":
        argv += ["--ray-cpus", "0.5", "--stages", "2"]
    env = {k: v for k, v in os.environ.items() if k != "STREAMGEN_TOKEN"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("streamgen serve: http://"):
                break
        url = re.search(r"http://\S+", lines[-1]).group(0)
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log = "".join(lines) + (out or "")
    assert proc.returncode == 0, log[-3000:]
    assert "SIGTERM received" not in log and "Traceback" not in log, log[-3000:]
