"""`streamgen bench avatar` runs end to end (server, client processes speaking espeak-ng speech, recordings)
and measures what it says: frames with real audio, and the viewer's A/V offset within ±2 frames."""
from __future__ import annotations

import json

from streamgen.cli import main


def test_bench_avatar_measures_latency_offset_and_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "avatar.json"
    assert main(["bench", "avatar", "--sessions", "1", "--seconds", "8", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (load,) = result["loads"]
    assert result["speech"] == "espeak-ng" and load["sessions"] == 1 and not load["failed_clients"]
    assert load["frames_measured"] > 0 and load["av_latency_ms_p95"] >= load["av_latency_ms_p50"] > 0
    assert load["av_offset_frames"][0] is not None and abs(load["av_offset_frames"][0]) <= 2
    assert 0 < load["cpu_per_session_pct"]
    assert "audio in → frame out" in capsys.readouterr().out
