"""Server metrics in the Prometheus text format (`GET /metrics`).

Hand-rolled (a few counters and two histograms) to avoid a dependency; written from the event loop
and from generation threads, hence the lock.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]

COUNTERS = {
    "streamgen_sessions_opened_total": "Sessions started by POST /offer.",
    "streamgen_sessions_resumed_total": "Reconnects that resumed a session within its grace period.",
    "streamgen_sessions_closed_total": "Sessions closed, by reason.",
    "streamgen_frames_generated_total": "Frames produced by the model.",
    "streamgen_frames_sent_total": "New frames sent on video tracks.",
    "streamgen_frames_held_total": "Ticks that re-sent the last frame (first chunk, pause, model slower than real time).",
    "streamgen_frames_dropped_total": "Frames dropped instead of played late, by reason.",
    "streamgen_control_messages_total": "Control messages, by result.",
    "streamgen_stalls_total": "Backend faults recovered mid-stream (actor replaced), each reported to its viewer as `stall`.",
    "streamgen_offers_total": "POST /offer answers, by HTTP status.",
    "streamgen_whep_offers_total": "POST /whep answers, by HTTP status.",
    "streamgen_whip_offers_total": "POST /whip answers, by HTTP status.",
    "streamgen_audio_messages_total": "Messages on avatar sessions' audio WebSockets, by result.",
}
HISTOGRAMS = {
    "streamgen_chunk_latency_seconds": ("Time to generate and decode one chunk.",
                                        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)),
    "streamgen_first_frame_seconds": ("From POST /offer to the first frame sent.",
                                      (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)),
}


class Metrics:
    """Counters and histograms; gauges are passed in at render time by their owners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {name: defaultdict(float) for name in COUNTERS}
        self._buckets = {name: [0] * (len(b) + 1) for name, (_, b) in HISTOGRAMS.items()}
        self._sums = dict.fromkeys(HISTOGRAMS, 0.0)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, seconds: float) -> None:
        bounds = HISTOGRAMS[name][1]
        with self._lock:
            self._buckets[name][bisect.bisect_left(bounds, seconds)] += 1
            self._sums[name] += seconds

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: dict[str, tuple[str, dict[Labels, float]]]) -> str:
        """Prometheus exposition text; `gauges` maps name → (help, {labels: value})."""
        out: list[str] = []
        with self._lock:
            for name, (help_text, series) in gauges.items():
                _family(out, name, help_text, "gauge", series)
            for name, help_text in COUNTERS.items():
                _family(out, name, help_text, "counter", self._counters[name] or {(): 0.0})
            for name, (help_text, bounds) in HISTOGRAMS.items():
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                total = 0
                for bound, count in zip((*map(str, bounds), "+Inf"), self._buckets[name], strict=True):
                    total += count
                    out.append(f'{name}_bucket{{le="{bound}"}} {total}')
                out += [f"{name}_sum {self._sums[name]:.6f}", f"{name}_count {total}"]
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, help_text: str, kind: str, series: dict[Labels, float]) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in sorted(series.items()):
        text = ",".join(f'{k}="{v}"' for k, v in labels)
        out.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
