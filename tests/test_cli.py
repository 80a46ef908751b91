"""The `streamgen` command: every subcommand's help renders, bad names give a clear error and exit 2."""
from __future__ import annotations

import argparse

import pytest

from streamgen.cli import build_parser, main


def subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner_name, inner in subparsers(sub):
                    yield f"{name} {inner_name}", inner


def test_every_subcommand_help_renders() -> None:
    names = []
    for name, sub in subparsers(build_parser()):
        assert sub.format_help()  # a '%' in a help string breaks this
        names.append(name)
    assert {"verify-fixture", "bench engine", "bench pipeline", "bench serve", "serve", "client", "models", "train", "render", "eval"} <= set(names)


def test_unknown_policy_is_a_clear_error(capsys) -> None:
    assert main(["bench", "engine", "--policy", "lru", "--chunks", "1", "--quiet"]) == 2
    assert "unknown cache policy 'lru'; known: deep_sink" in capsys.readouterr().err


def test_verify_fixture_exit_codes(tmp_path, capsys) -> None:
    assert main(["verify-fixture", "tests/fixtures/self_forcing"]) == 0
    out = capsys.readouterr().out
    passed = out.count("\n  ok ")
    assert "PASS" in out and passed > 0
    assert out.splitlines()[-1].startswith(f"1/1 folders ran, {passed}/{passed} outputs passed, max |Δ| "), out
    assert main(["verify-fixture", "tests/fixtures/self_forcing", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "not a fixture folder" in captured.err
    assert captured.out.splitlines()[-1].startswith(f"1/2 folders ran, {passed}/{passed} outputs passed"), captured.out


@pytest.mark.parametrize("schedule", ["exact", "timestep-slot"])
def test_bench_engine_saves_json(tmp_path, schedule) -> None:
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "engine", "--chunks", "4", "--schedule", schedule, "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["chunks"] == 4 and result["kv_bytes"] > 0 and result["dit_call_ms"] > 0
    if schedule == "exact":
        assert result["dit_calls_per_chunk"] == 5  # 4 steps + the clean rerun
    else:
        assert result["dit_calls_per_chunk"] < 4  # stream batch: one forward carries every slot of a tick


def test_real_family_needs_a_checked_model_dir(tmp_path, capsys) -> None:
    """`--model FAMILY` selects the family's settings; missing files are named before any work starts."""
    out = tmp_path / "x.mp4"
    assert main(["render", "--model", "longlive", "--prompt", "a fox", "--seconds", "1", "-o", str(out)]) == 2
    assert "needs --model-dir" in capsys.readouterr().err
    assert main(["render", "--model", "longlive", "--model-dir", str(tmp_path), "--prompt", "a fox", "--seconds", "1",
                 "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "LongLive needs models/lora.pt" in err and "models_t5_umt5-xxl-enc-bf16.pth" in err
    assert not out.exists()


def test_bench_engine_real_architecture_with_decode(tmp_path) -> None:
    """`--model …` runs DiT + decoder end to end and reports time to first frame."""
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "engine", "--model", "wan2.1-t2v-1.3b", "--size", "32x32", "--layers", "1",
                 "--dim", "128", "--chunks", "2", "--decoder", "taehv", "--quiet", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["video_frames_decoded"] == 9 + 12  # 1 + 4·2 frames for the first chunk, 12 for the next
    assert result["time_to_first_frame_s"] > 0 and result["decode_ms_p50"] > 0


def test_bench_jobs_saves_json(tmp_path, capsys) -> None:
    import json

    out = tmp_path / "jobs.json"
    assert main(["bench", "jobs", "--model", "tiny-random", "--seconds", "1", "--renders", "2", "--concurrency", "2",
                 "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoints"] >= 1 and result["checkpoint_bytes"] > 0 and result["resume_ms"] > 0
    assert result["resumed_at_frame"] > 0 and result["one_by_one_fps"] > 0 and result["queued_fps"] > 0
    assert "resume (load + restore)" in capsys.readouterr().out
