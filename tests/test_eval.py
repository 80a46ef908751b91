"""`streamgen eval` (streamgen/evaluation/): end to end on a tiny random-init embedded model
(JSON + Markdown, one row per policy × schedule, switch latency, long stream), the ground-truth path
scored at 100% through the same reporting code, and clear errors. A few seconds on one thread."""
from __future__ import annotations

import json

import pytest
import torch

from streamgen.bundles.embedded import EmbeddedModel, save_weights
from streamgen.evaluation.cli import main
from streamgen.evaluation.plan import SWITCH_KINDS, parse_policy, prompt_items, switch_items
from streamgen.evaluation.report import write_outputs
from streamgen.evaluation.run import evaluate_source
from streamgen.evaluation.sources import WorldSource
from streamgen.models.config import DiTConfig

TINY = DiTConfig(dim=32, ffn_dim=64, freq_dim=32, text_dim=16, text_len=4, num_heads=2, num_layers=2,
                 in_dim=3, out_dim=3, patch_size=(1, 4, 4))
POLICIES = ["window_sink:rope=relative,sink_frames=0", "ema_sink"]
SCHEDULES = ["exact", "timestep-slot"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_weights(EmbeddedModel(TINY), tmp_path_factory.mktemp("model") / "embedded.safetensors")


def _rates_in_unit_interval(metrics: dict) -> None:
    for key, value in metrics.items():
        if key.startswith(("rates.", "drift.first.", "drift.last.")) and not key.endswith(("sharpness", "area")):
            assert 0.0 <= value <= 1.0, (key, value)
    assert 0.0 <= metrics["quality.mid_fraction"] <= 1.0


def test_cli_end_to_end_on_a_tiny_model(weights, tmp_path, capsys, one_thread):
    out = tmp_path / "eval"
    code = main(["--weights", str(weights), "--policies", *POLICIES, "--schedules", *SCHEDULES, "--prompts", "2",
                 "--frames", "12", "--switches", "4", "--long-frames", "36", "--threads", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "eval.json").read_text())
    md = (out / "eval.md").read_text()
    assert md in printed                                   # the Markdown summary is printed

    groups = doc["groups"]
    assert [(g["policy"], g["sampler"]) for g in groups] == [(p, f"few_step/{s}") for p in POLICIES for s in SCHEDULES]
    assert groups[0]["settings"]["policy_settings"] == {"capacity_frames": 9, "sink_frames": 0, "rope": "relative"}
    assert groups[2]["settings"]["policy_settings"] == {}  # not the model's policy: the reference defaults
    for g in groups:
        assert g["runs"] == 2 and g["switch_runs"] == 4 and g["metrics"]["frames"] == 12
        _rates_in_unit_interval(g["metrics"])
        assert g["latency"]["prompt"]["switches"] == 4     # measurable at the chunk boundary in both schedules
        assert sum(g["latency"][a]["switches"] for a in ("colour", "shape", "direction")) == 1 + 1 + 1 + 3
        assert set(g["latency_by_kind"]) == set(SWITCH_KINDS)
    assert len(doc["runs"]) == len(groups) * (2 + 4) and not doc["failures"]

    long = doc["long"]
    assert long["frames"] == 36 and long["policy"] == "window_sink" and long["window_frames"] == 16
    assert long["chunk_time"]["chunks"] == 12 and long["chunk_time"]["wall"]["first_ms"] > 0
    assert all(0.0 <= long["drift"][w][k] <= 1.0 for w in ("first", "last") for k in ("all", "colour", "mid_fraction"))

    for row in (*POLICIES, "few_step/timestep-slot"):
        assert row in md
    assert "## Switch latency per policy × sampler" in md and "## Switch latency per switch kind" in md
    assert "## Long stream: 36 frames" in md and "last / first" in md
    assert sum(line.startswith("| window_sink:rope=relative,sink_frames=0 | few_step/") for line in md.splitlines()) >= 4


def test_ground_truth_scores_100_percent_through_the_same_report(tmp_path):
    doc = evaluate_source(WorldSource(), [parse_policy(p) for p in POLICIES], SCHEDULES, steps=None, prompts=6,
                          frames=24, switches=8, long_frames=60, seed=3, threads=1, progress=False)
    _, _, md = write_outputs(doc, tmp_path)
    assert len(doc["groups"]) == 4 and not doc["failures"]
    for g in doc["groups"]:
        m = g["metrics"]
        assert all(m[f"rates.{k}"] == 1.0 for k in ("colour", "shape", "direction", "colour_direction", "all"))
        assert m["rates.still"] == 0.0 and m["quality.mid_fraction"] == 0.0
        for attr, summary in g["latency"].items():
            assert summary["never"] == 0 and summary["max_frames"] == 0 and summary["max_chunks"] == 0, attr
        assert g["latency"]["prompt"]["switches"] == 8
    assert doc["long"]["drift"]["first"]["all"] == doc["long"]["drift"]["last"]["all"] == 1.0
    assert "| window_sink:rope=relative,sink_frames=0 | few_step/exact | 6 | 24 | 100.0% | 100.0% | 100.0%" in md
    assert json.loads((tmp_path / "eval.json").read_text())["groups"][0]["metrics"]["rates.all"] == 1.0


def test_all_prompts_and_switch_kinds():
    prompts = prompt_items("all", 0)
    assert len(prompts) == len(set(prompts)) == 84
    assert prompt_items(5, 1) == prompt_items(5, 1) and len(set(prompt_items(5, 1))) == 5
    items = switch_items(8, 48, 3, 0)
    assert [k for k, _ in items] == [*SWITCH_KINDS, *SWITCH_KINDS]
    from streamgen.world import parse_prompt

    for kind, [(f0, a), (f1, b)] in items:
        pa, pb = parse_prompt(a).prompt, parse_prompt(b).prompt
        changed = {attr for attr in ("colour", "shape", "direction") if getattr(pa, attr) != getattr(pb, attr)}
        assert (f0, f1) == (0, 24) and changed == ({"colour", "shape", "direction"} if kind == "all" else {kind})


def test_clear_errors(weights, tmp_path, capsys):
    assert main(["--weights", str(weights), "--policies", "lru", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown cache policy 'lru'; known: deep_sink" in err and "ema_sink" in err and "window_sink" in err
    assert main(["--weights", str(weights), "--policies", "window_sink:sinks=2", "--out", str(tmp_path / "a")]) == 2
    assert "policy 'window_sink:sinks=2'" in capsys.readouterr().err
    missing = tmp_path / "missing.safetensors"
    assert main(["--weights", str(missing), "--out", str(tmp_path / "a")]) == 2
    assert f"weights file not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
