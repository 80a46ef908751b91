"""How many torch threads the engine should use on the CPU: as many as there are idle cores.

Measured on a 2-core box (`bench engine --threads 1|2`, `render --seconds 10`): with both cores idle, two
threads beat one by 0–25 % at every model size tried (d128 to d1024, 0.3–6 GFLOP per call); with one
core busy elsewhere, two threads are 2–3× *slower* than one (d512: 239 vs 72 ms per chunk; embedded
render 11.5 vs 6.2 s), because torch's worker threads wait on the one that shares a core. So the default
counts the cores that are idle now, not the cores the machine has."""
from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def _cpu_times() -> dict[str, tuple[int, int]]:
    """(idle, total) jiffies per cpu line of /proc/stat ('cpu0', 'cpu1', …)."""
    times = {}
    for line in PROC_STAT.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields]
            times[name] = (values[3] + values[4], sum(values[:8]))  # idle + iowait; user … steal
    return times


def idle_cores(sample_s: float = 0.1) -> float | None:
    """Cores' worth of idle time over the next `sample_s` seconds (None where /proc/stat is unreadable)."""
    try:
        before = _cpu_times()
        time.sleep(sample_s)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for cpu, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(cpu, (idle_after, total_after))
        if total_after > total_before:
            idle += (idle_after - idle_before) / (total_after - total_before)
    return idle


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(share: int = 1) -> int:
    """Torch threads for one of `share` equal consumers of this machine's idle cores (at least 1)."""
    cores = usable_cores()
    idle = idle_cores()
    available = cores if idle is None else min(cores, int(idle + 0.5))
    return max(1, available // max(1, share))
