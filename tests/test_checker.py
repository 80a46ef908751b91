"""The non-learned checker, validated on rendered ground truth, on noise and on controlled defects; the report."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamgen.world import (COLOURS, DIRECTIONS, GRID, SHAPES, Prompt, WorldState, all_prompts, make_clip, render,
                             render_stream, sample_batch)
from streamgen.world import checker as ck
from streamgen.world.render import shape_template
from streamgen.world.report import aggregate, markdown, write_report

RATES = ("colour", "shape", "direction", "colour_direction", "all")


# ---------------------------------------------------------------------------------------------- ground truth

def test_ground_truth_random_clips_score_100_percent():
    rng = np.random.default_rng(2024)
    n_events = 0
    for _ in range(300):
        clip = make_clip(rng, 16, 0.6)
        m = ck.clip_metrics(clip.frames, clip.prompts, warmup=0)
        assert all(m["rates"][k] == 1.0 for k in RATES), (m["rates"], clip.prompts)
        assert m["rates"]["still"] == 0.0
        assert m["quality"]["mid_fraction"] == 0.0
        for e in m["switch_events"]:
            if e["measurable"]:
                n_events += 1
                assert e["latency_frames"] == 0 and e["latency_chunks"] == 0, e
    assert n_events > 300


def test_ground_truth_every_prompt_and_start_position():
    rng = np.random.default_rng(0)
    for p in all_prompts():
        for _ in range(3):
            r, c = rng.integers(0, GRID, 2)
            frames, _ = render_stream([p] * 10, int(r), int(c))
            a = ck.analyze(frames)
            assert a.colour == [p.colour] * 10 and a.shape == [p.shape] * 10
            assert a.direction == [None] + [p.direction] * 9
            assert (np.abs(a.shift[1:]).sum(1) == 4).all()
            assert (np.abs(a.shape_ious.max(1) - 1.0) < 1e-12).all()


def test_ground_truth_batch_tokens_as_prompts():
    video, tokens = sample_batch(5, 16, 12, 0.5)
    for b in range(16):
        m = ck.clip_metrics(video[b], tokens[b].numpy(), warmup=1)
        assert all(m["rates"][k] == 1.0 for k in RATES)


@pytest.mark.parametrize("old_shape", SHAPES)
def test_direction_across_every_shape_switch_at_every_position(old_shape):
    """Consecutive frames with different shapes (a shape switch) still give the right direction."""
    for new_shape in SHAPES:
        for d in DIRECTIONS:
            frames = []
            for r in range(GRID):
                for c in range(GRID):
                    a = WorldState(Prompt("red", old_shape, d), r, c)
                    frames += [render(a), render(step_to(a, new_shape))]
            an = ck.analyze(np.stack(frames))
            assert an.direction[1::2] == [d] * (GRID * GRID), (old_shape, new_shape, d)
            assert an.shape[1::2] == [new_shape] * (GRID * GRID)


def step_to(state: WorldState, shape: str) -> WorldState:
    from streamgen.world import step
    return step(state, state.prompt.replace(shape=shape))


def test_shape_classifier_at_every_pixel_offset_including_wrap():
    """All 1024 pixel offsets (on and off the token grid, wrapping across every edge) for each shape."""
    for s, name in enumerate(SHAPES):
        base = shape_template(s)
        masks = np.stack([np.roll(base, (dy, dx), (0, 1)) for dy in range(32) for dx in range(32)])
        frames = np.repeat(masks[:, None].astype(np.float32), 3, axis=1)
        a = ck.analyze(frames)
        assert a.shape == [name] * 1024
        assert np.allclose(a.shape_ious[:, s], 1.0)
        others = np.delete(a.shape_ious, s, axis=1)
        assert others.max() < 0.8  # the closest other template stays clearly below a perfect match
        offs = np.array([(dy, dx) for dy in range(32) for dx in range(32)], dtype=np.float64) / 4
        assert np.allclose(a.anchor, offs)


def test_position_anchor_and_centroid_at_every_token_including_wrap():
    for shape in ("circle", "square"):
        states = [WorldState(Prompt("blue", shape, "up"), r, c) for r in range(GRID) for c in range(GRID)]
        a = ck.analyze(np.stack([render(s) for s in states]))
        rc = np.array([(s.row, s.col) for s in states], dtype=np.float64)
        assert np.allclose(a.anchor, rc)
        # symmetric shapes: centroid = the anchor point (pixel-index units: 4·token + 1.5), on the torus
        expect = (4 * rc + 1.5) % 32
        diff = (a.centroid - expect + 16) % 32 - 16
        assert np.abs(diff).max() < 1e-6


def test_every_colour_is_decoded():
    for colour in COLOURS:
        for shape in SHAPES:
            a = ck.analyze(render(WorldState(Prompt(colour, shape, "left"), 3, 3)))
            assert a.colour == [colour] and a.colour_dist[0] == 0.0


# ---------------------------------------------------------------------------------------------- noise and defects

def test_uniform_noise_scores_zero():
    rng = np.random.default_rng(1)
    noise = rng.random((40, 3, 32, 32)).astype(np.float32)
    for p in (Prompt("white", "circle", "right"), Prompt("red", "square", "left")):
        m = ck.clip_metrics(noise, p)
        assert all(m["rates"][k] == 0.0 for k in RATES)
        assert m["quality"]["mid_fraction"] > 0.8
        assert m["quality"]["sharpness"] > 0.3


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "black", "blobs"])
def test_other_noise_scores_near_zero(kind):
    rng = np.random.default_rng(2)
    shape = (40, 3, 32, 32)
    if kind == "gaussian":
        x = np.clip(rng.normal(0.0, 0.3, shape), 0, 1)
    elif kind == "sparse":
        x = (rng.random((40, 1, 32, 32)) < 0.1) * rng.random(shape)
    elif kind == "black":
        x = np.zeros(shape)
    else:  # scattered coloured 4×4 patches (the tiny study's failure mode)
        x = np.zeros(shape)
        for t in range(40):
            for _ in range(5):
                r, c = rng.integers(0, 8, 2)
                x[t, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = rng.integers(0, 2, (3, 1, 1))
    for p in all_prompts()[::7]:
        m = ck.clip_metrics(x, p)
        assert m["rates"]["all"] <= 0.05, (kind, p, m["rates"])
        assert m["rates"]["shape"] <= 0.05
    if kind == "black":
        a = ck.analyze(x)
        assert a.colour == [None] * 40 and a.shape == [None] * 40 and a.direction == [None] * 40


def test_mid_fraction_and_sharpness():
    clip = make_clip(3, 20, 0.5)
    a = ck.analyze(clip.frames)
    assert (a.mid_fraction == 0).all()
    assert 0.005 < a.sharpness.mean() < 0.05
    half = np.full((1, 3, 32, 32), 0.5, np.float32)
    assert ck.analyze(half).mid_fraction[0] == 1.0 and ck.analyze(half).sharpness[0] == 0.0
    blurred = clip.frames.copy()
    blurred = 0.25 * (blurred + np.roll(blurred, 1, 2) + np.roll(blurred, 1, 3) + np.roll(blurred, (1, 1), (2, 3)))
    assert ck.analyze(blurred).mid_fraction.mean() > 0.02


def test_still_object_and_wrong_attributes():
    p = Prompt("red", "triangle", "down")
    still = np.stack([render(WorldState(p, 2, 2))] * 8)
    a = ck.analyze(still)
    assert a.direction == [None] + [ck.STILL] * 7
    m = ck.clip_metrics(still, p)
    assert m["rates"]["direction"] == 0.0 and m["rates"]["still"] == 1.0
    assert m["rates"]["colour"] == 1.0 and m["rates"]["shape"] == 1.0
    frames, _ = render_stream([p] * 8, 0, 0)
    for wrong, expect in ((p.replace(colour="blue"), "colour"), (p.replace(shape="circle"), "shape"),
                          (p.replace(direction="up"), "direction")):
        r = ck.clip_metrics(frames, wrong)["rates"]
        assert r[expect] == 0.0 and r["all"] == 0.0
        assert all(r[k] == 1.0 for k in ("colour", "shape", "direction") if k != expect)


def test_inputs_torch_uint8_single_frame_and_text_prompts():
    clip = make_clip(11, 9, 0.0)
    p = clip.prompts[0]
    ref = ck.clip_metrics(clip.frames, clip.prompts)
    assert ck.clip_metrics(torch.from_numpy(clip.frames), p) == ref
    assert ck.clip_metrics((clip.frames * 255).astype(np.uint8), p.text()) == ref
    assert ck.clip_metrics(torch.from_numpy((clip.frames * 255).astype(np.uint8)), [p.text()] * 9) == ref
    assert ck.analyze(clip.frames[0]).shape == [p.shape]
    assert ck.classify_shape(clip.frames[0].max(0) > 0) == p.shape
    with pytest.raises(ValueError):
        ck.clip_metrics(clip.frames, [p] * 3)
    with pytest.raises(ValueError):
        ck.analyze(np.zeros((2, 32, 32, 3)))


# ---------------------------------------------------------------------------------------------- switch latency

def _delayed_switch(old: Prompt, new: Prompt, s: int, delay: int, T: int = 18):
    """Prompts switch at s; the rendering follows the new prompt only from s + delay."""
    prompts = [old] * s + [new] * (T - s)
    shown = [old] * (s + delay) + [new] * (T - s - delay)
    frames, _ = render_stream(shown, 1, 6)
    return frames, prompts


def test_switch_latency_zero_on_rendered_switch():
    old, new = Prompt("red", "circle", "left"), Prompt("blue", "triangle", "up")
    frames, prompts = _delayed_switch(old, new, 6, 0)
    m = ck.clip_metrics(frames, prompts)
    assert {e["attribute"] for e in m["switch_events"]} == {"colour", "shape", "direction", "prompt"}
    for attr in ("colour", "shape", "direction", "prompt"):
        lat = m["switch_latency"][attr]
        assert lat["switches"] == 1 and lat["never"] == 0
        assert lat["median_frames"] == 0 and lat["median_chunks"] == 0


@pytest.mark.parametrize("attr,value", [("colour", "green"), ("shape", "square"), ("direction", "down")])
@pytest.mark.parametrize("delay", [1, 2, 4])
def test_switch_latency_counts_delayed_frames(attr, value, delay):
    old = Prompt("red", "circle", "left")
    new = old.replace(**{attr: value})
    s = 6
    frames, prompts = _delayed_switch(old, new, s, delay)
    events = {e["attribute"]: e for e in ck.clip_metrics(frames, prompts)["switch_events"]}
    assert set(events) == {attr, "prompt"}
    for e in events.values():
        assert e["latency_frames"] == delay
        assert e["latency_chunks"] == (s + delay) // 3 - s // 3
    events = ck.switch_events(ck.score(ck.analyze(frames), prompts), chunk_frames=4)
    assert events[0]["latency_chunks"] == (s + delay) // 4 - s // 4


def test_switch_latency_never_and_unmeasurable():
    old, new = Prompt("red", "circle", "left"), Prompt("green", "circle", "left")
    frames, _ = render_stream([old] * 12, 0, 0)
    prompts = [old] * 4 + [new] * 8
    lat = ck.clip_metrics(frames, prompts)["switch_latency"]["colour"]
    assert lat["switches"] == 1 and lat["never"] == 1 and lat["median_frames"] is None
    prompts = [old] * 10 + [new] * 2  # only 2 frames left: cannot hold for 3
    m = ck.clip_metrics(frames, prompts)
    assert m["switch_events"][0]["measurable"] is False
    assert m["switch_latency"]["colour"]["switches"] == 0


def test_several_switches_in_a_stream():
    ps = [Prompt("red", "circle", "left")] * 10 + [Prompt("blue", "circle", "up")] * 10 + \
         [Prompt("blue", "square", "up")] * 10 + [Prompt("white", "triangle", "right")] * 10
    frames, _ = render_stream(ps, 4, 4)
    m = ck.clip_metrics(frames, ps)
    assert [e["frame"] for e in m["switch_events"] if e["attribute"] == "prompt"] == [10, 20, 30]
    assert m["switch_latency"]["prompt"] == {"switches": 3, "never": 0, "median_frames": 0.0, "mean_frames": 0.0,
                                             "max_frames": 0, "median_chunks": 0.0, "max_chunks": 0}
    assert m["switch_latency"]["shape"]["switches"] == 2
    assert all(m["rates"][k] == 1.0 for k in RATES)


# ---------------------------------------------------------------------------------------------- drift, segments

def test_drift_and_segments():
    p = Prompt("yellow", "square", "right")
    frames, _ = render_stream([p] * 60, 0, 0)
    m = ck.clip_metrics(frames, p, drift_frames=10)
    assert m["drift"]["frames"] == 10
    assert all(v == 0.0 for k, v in m["drift"]["delta"].items() if k != "sharpness")
    rng = np.random.default_rng(0)
    degraded = frames.copy()
    degraded[30:] = np.clip(degraded[30:] + rng.normal(0, 0.25, degraded[30:].shape), 0, 1).astype(np.float32)
    d = ck.clip_metrics(degraded, p, drift_frames=10)["drift"]
    assert d["delta"]["mid_fraction"] > 0.2 and d["first"]["mid_fraction"] == 0.0
    segs = ck.segment_metrics(degraded, p, 20)
    assert [(s["start"], s["end"]) for s in segs] == [(0, 20), (20, 40), (40, 60)]
    assert segs[0]["mid_fraction"] == 0.0 and segs[2]["mid_fraction"] > 0.2
    assert ck.clip_metrics(frames[:3], p)["drift"] is None  # nothing after the warm-up


def test_warmup_is_a_parameter():
    p = Prompt("cyan", "circle", "down")
    frames, _ = render_stream([p] * 12, 0, 0)
    frames[:5] = 0  # nothing in the first 5 frames
    assert ck.clip_metrics(frames, p, warmup=3)["rates"]["colour"] == pytest.approx(7 / 9)
    assert ck.clip_metrics(frames, p, warmup=5)["rates"]["colour"] == 1.0
    # direction at frame 5 compares with the empty frame 4: not decodable
    assert ck.clip_metrics(frames, p, warmup=6)["rates"]["all"] == 1.0
    assert ck.clip_metrics(frames, p, warmup=5)["evaluated_frames"] == 7


# ---------------------------------------------------------------------------------------------- report

def test_report_tables_per_policy_and_sampler(tmp_path):
    rng = np.random.default_rng(4)
    runs = []
    for policy in ("window_sink", "full"):
        for sampler in ("few_step", "rolling"):
            for _ in range(2):
                clip = make_clip(rng, 30, 1.0, switch_align=3)
                frames = clip.frames
                if policy == "full":
                    frames = np.clip(frames + rng.normal(0, 0.3, frames.shape), 0, 1)
                m = ck.clip_metrics(frames, clip.prompts)
                runs.append({"policy": policy, "sampler": sampler, "prompt": clip.prompts[0].text(),
                             "segments": ck.segment_metrics(frames, clip.prompts, 10), **m})
    runs.append({"policy": "window_sink", "sampler": "few_step", "rates": {"all": float("nan")}})  # tolerated
    doc = write_report(runs, tmp_path / "a" / "r.json", tmp_path / "b" / "r.md", title="T")
    loaded = json.loads((tmp_path / "a" / "r.json").read_text())
    assert loaded == doc and loaded["title"] == "T"
    groups = {(g["policy"], g["sampler"]): g for g in loaded["groups"]}
    assert set(groups) == {(p, s) for p in ("window_sink", "full") for s in ("few_step", "rolling")}
    assert groups[("window_sink", "few_step")]["runs"] == 3
    assert groups[("window_sink", "rolling")]["metrics"]["rates.all"] == 1.0
    assert groups[("full", "rolling")]["metrics"]["quality.mid_fraction"] > 0.3
    lat = groups[("window_sink", "rolling")]["latency"]["prompt"]
    assert lat["switches"] == sum(1 for r in runs[2:4] for e in r["switch_events"]
                                  if e["attribute"] == "prompt" and e["measurable"])
    assert len(groups[("full", "few_step")]["segments"]) == 3
    md = (tmp_path / "b" / "r.md").read_text()
    assert md.startswith("# T")
    assert "| policy | sampler | runs |" in md and "| policy \\ sampler | few_step | rolling |" in md
    assert "| window_sink | rolling | 2 |" in md and "100.0%" in md
    assert md == markdown(aggregate(runs), title="T")


def test_report_custom_group_keys_and_missing_keys(tmp_path):
    runs = [{"policy": "window_sink", "rates": {"all": 0.5}}, {"rates": {"all": 1.0}}]
    doc = write_report(runs, tmp_path / "r.json", tmp_path / "r.md", group_keys=("policy",))
    assert [g["policy"] for g in doc["groups"]] == ["window_sink", "-"]
    assert doc["groups"][1]["metrics"]["rates.all"] == 1.0
