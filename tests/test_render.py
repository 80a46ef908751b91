"""`streamgen render`: MP4 output (decoded with PyAV; ffprobe too when installed), timeline switches
landing at chunk boundaries, latents file, determinism, bad-timeline errors with line numbers."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from streamgen.backends import LocalBackend
from streamgen.render.cli import add_render_parser
from streamgen.render.job import (
    RenderJob,
    frame_count,
    latent_for_video,
    plan_switches,
    run_job,
)
from streamgen.render.timeline import (
    TimelineEntry,
    TimelineError,
    parse_timeline,
    single_prompt,
)
from streamgen.render.writer import load_latents, output_size, parse_output_size

MODEL = "tiny-random"  # 32×32 frames, 16 fps, 1 video frame per latent frame, 3-frame chunks

pytestmark = pytest.mark.usefixtures("one_thread")






def render_cli(*argv: str) -> int:
    """`streamgen render ARGV` through a fresh parser built with add_render_parser."""
    parser = argparse.ArgumentParser(prog="streamgen")
    add_render_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["render", "--model", MODEL, *argv])
    return args.func(args)


def render_latents(tiny_bundle, timeline, seconds=1.0, **job) -> tuple[torch.Tensor, object]:
    backend = LocalBackend(tiny_bundle)
    out = job.pop("latents_out")
    result = run_job(RenderJob(timeline=timeline, seconds=seconds, latents_out=out, **job), backend)
    return load_latents(out)[0], result


def decode(path: Path) -> tuple[list, av.video.stream.VideoStream]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        info = {"codec": stream.codec_context.name, "width": stream.codec_context.width,
                "height": stream.codec_context.height, "pix_fmt": stream.codec_context.pix_fmt,
                "rate": stream.average_rate}
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    return frames, info


# --- the MP4 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds,size,fps,expect_size", [(1.0, "64", None, (64, 64)), (0.7, "48x32", "24", (48, 32))])
def test_render_writes_valid_mp4(tmp_path, tiny_bundle, capsys, seconds, size, fps, expect_size):
    out = tmp_path / "out.mp4"
    lat = tmp_path / "lat.safetensors"
    rc = render_cli("--prompt", "a red fox", "--seconds", str(seconds), "--size", size, "-o", str(out),
                    "--latents-out", str(lat), "--model", MODEL, "--quiet", *(["--fps", fps] if fps else []))
    assert rc == 0
    frames, info = decode(out)
    n = round(seconds * tiny_bundle.fps)  # model fps: 16 and 11 frames (the last chunk trimmed)
    assert len(frames) == n
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == expect_size and expect_size[0] % 2 == 0 == expect_size[1] % 2
    assert float(info["rate"]) == float(fps or tiny_bundle.fps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.safetensors", "out.mp4"]  # no partial files left
    # The pictures are the rendered frames, in order: decode the saved latents and scale them the same way.
    latents, _ = load_latents(lat)
    expected = tiny_bundle.decoder().push(latents)[0][:n]
    if expect_size == (64, 64):  # nearest 2× upscale
        expected = expected.repeat_interleave(2, 1).repeat_interleave(2, 2)
        err = (torch.from_numpy(np.stack(frames)).float() - expected.float()).abs().mean(dim=(1, 2, 3))
        assert err.max() < 4, err  # H.264 at CRF 18, 4:2:0 chroma (≈2.3 measured)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"rendered {n} frames") and "frames/s" in summary and str(out) in summary
    if shutil.which("ffprobe"):
        probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                                "stream=codec_name,width,height,pix_fmt,nb_read_frames", "-of", "json", str(out)],
                               capture_output=True, text=True, timeout=60, check=False)
        assert probe.returncode == 0 and probe.stderr == "", probe.stderr
        s = json.loads(probe.stdout)["streams"][0]
        assert (s["codec_name"], s["pix_fmt"], s["width"], s["height"], int(s["nb_read_frames"])) == \
            ("h264", "yuv420p", *expect_size, n)


# --- timeline switches, latents file --------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["exact", "timestep-slot"])
def test_timeline_switch_lands_at_chunk_boundary(tmp_path, tiny_bundle, schedule):
    timeline = [TimelineEntry(0.0, "a red fox"), TimelineEntry(0.5, "a blue bird")]
    switched, result = render_latents(tiny_bundle, timeline, seed=5, schedule=schedule, latents_out=tmp_path / "a.safetensors")
    single, _ = render_latents(tiny_bundle, single_prompt("a red fox"), seed=5, schedule=schedule,
                               latents_out=tmp_path / "b.safetensors")
    # 0.5 s = video frame 8 = latent frame 8 → the first chunk starting at or after it: chunk 3, frame 9
    s = result.switches[1]
    assert (s.video_frame, s.latent_frame, s.chunk, s.landed) == (8, 8, 3, 9)
    assert switched.shape == single.shape == (1, 16, 16, 8, 8)  # 16 frames (6 chunks of 3, the last trimmed)
    assert torch.equal(switched[:, :9], single[:, :9])
    assert (switched[:, 9:] - single[:, 9:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-3  # every frame after differs


def test_timeline_cli_latents_file(tmp_path, tiny_bundle, capsys):
    tl = tmp_path / "story.yaml"
    tl.write_text("- at: 0\n  prompt: a red fox\n- at: 0.4\n  prompt: night falls\n"
                  "  transition: {kind: blend, chunks: 2, interpolation: slerp}\n")
    lat = tmp_path / "story.safetensors"
    assert render_cli("--timeline", str(tl), "--seconds", "1", "--seed", "7", "--latents-out", str(lat), "--quiet") == 0
    latents, meta = load_latents(lat)
    assert latents.shape == (1, 16, 16, 8, 8) and latents.dtype == torch.float32  # the 16 frames written
    assert meta["model"] == MODEL and meta["seed"] == "7" and meta["frames"] == "16" and meta["schedule"] == "exact"
    assert parse_timeline(meta["timeline"], fmt="json") == [
        TimelineEntry(0.0, "a red fox", None, 1, 0),
        TimelineEntry(0.4, "night falls", parse_timeline(meta["timeline"], fmt="json")[1].transition, 1, 1)]
    assert json.loads(meta["timeline"])[1]["transition"] == {"kind": "blend", "chunks": 2, "interpolation": "slerp"}
    out = capsys.readouterr().out
    assert "0.4 s 'night falls' (blend) → frame 9" in out  # 0.4 s = frame 6.4 → 7 → chunk 3


def test_wan_like_frame_mapping(tmp_path, tiny_bundle):
    """A decoder with the Wan VAE's counts (1 video frame for latent 0, then 4 per latent): the switch
    maps through `video_frame`, the frame count is exact and the last chunk is trimmed."""
    class WanLike:
        def __init__(self):
            self.inner, self.seen = tiny_bundle.decoder(), 0

        def reset(self):
            self.seen = 0

        def video_frame(self, latent):
            return 0 if latent == 0 else 4 * latent - 3

        def push(self, latents):
            frames = self.inner.push(latents)
            reps = torch.tensor([1 if self.seen + i == 0 else 4 for i in range(latents.shape[1])])
            self.seen += latents.shape[1]
            return frames.repeat_interleave(reps, dim=1)

    wan = dataclasses.replace(tiny_bundle, decoder=WanLike)
    timeline = [TimelineEntry(0.0, "a red fox"), TimelineEntry(0.5, "a blue bird")]
    out = tmp_path / "wan.mp4"
    result = run_job(RenderJob(timeline, 1.0, out=out), LocalBackend(wan))
    # 0.5 s = video frame 8 → latent 3 (video frames 9–12) → chunk 1 (latents 3–5), first video frame 9
    s = result.switches[1]
    assert (s.video_frame, s.latent_frame, s.chunk, s.landed) == (8, 3, 1, 9)
    assert result.chunks == 2 and result.frames == 16  # 9 + 12 frames generated, 16 written
    assert len(decode(out)[0]) == 16


# --- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_latents_and_slot_batching(tmp_path, tiny_bundle):
    tl = [TimelineEntry(0.0, "a red fox"), TimelineEntry(0.3, "a blue bird")]
    a, _ = render_latents(tiny_bundle, tl, seconds=0.75, seed=3, latents_out=tmp_path / "a.safetensors")
    b, _ = render_latents(tiny_bundle, tl, seconds=0.75, seed=3, latents_out=tmp_path / "b.safetensors")
    c, _ = render_latents(tiny_bundle, tl, seconds=0.75, seed=4, latents_out=tmp_path / "c.safetensors")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    batched, _ = render_latents(tiny_bundle, tl, seconds=0.75, seed=3, schedule="timestep-slot",
                                latents_out=tmp_path / "d.safetensors")
    unbatched, _ = render_latents(tiny_bundle, tl, seconds=0.75, seed=3, schedule="timestep-slot", batch_slots=False,
                                  latents_out=tmp_path / "e.safetensors")
    assert (batched - unbatched).abs().max() <= 1e-5


# --- bad timelines ---------------------------------------------------------------------------------
BAD = [
    ("t.yaml", "- at: 0\n  prompt: a\n- at: 1\n  prompt: \"b\n- at: 2\n", 6, "YAML syntax error"),
    ("t.json", '[\n  {"at": 0, "prompt": "a"},\n  {"at": 1, "prompt": "b",}\n]\n', 3, "JSON syntax error"),
    ("t.yaml", "- at: 0\n  prompt: a\n- at: 2\n  prompt: b\n- at: 1\n  prompt: c\n", 5, "entry [2]: at 1 s is not after"),
    ("t.json", '[{"at": 0, "prompt": "a"},\n {"at": 2, "prompt": "b"},\n {"at": 1.5,\n  "prompt": "c"}]', 3,
     "entry [2]: at 1.5 s is not after entry [1]'s at 2 s: entries must be sorted by 'at'"),
    ("t.yaml", "- at: 0\n  prompt: a\n- at: -1\n  prompt: b\n", 3, "entry [1]: 'at' must be a finite number ≥ 0"),
    ("t.yaml", "- at: 0\n  prompt: a\n- at: 1\n  promt: b\n", 4, "entry [1]: unknown key 'promt'"),
    ("t.json", '[{"at": 0, "prompt": "a"},\n\n {"at": 1}]', 3, "entry [1]: missing 'prompt'"),
    ("t.yaml", "- at: 0\n  prompt: a\n- at: 1\n  prompt: b\n  transition:\n    kind: fade\n", 5,
     "entry [1]: bad transition kind 'fade'; known: recache, blend"),
    ("t.json", '[{"at": 0, "prompt": "a"},\n {"at": 1, "prompt": "b",\n  "transition": {"kind": "blend", "chunks": 0}}]',
     3, "entry [1]: transition 'chunks' must be a whole number ≥ 1"),
    ("t.yaml", "- at: 0\n  prompt: a\n- at: 1\n  prompt: b\n  prompt: c\n", 5, "entry [1]: duplicate key 'prompt'"),
    ("t.yaml", "- at: 1\n  prompt: a\n", 1, "entry [0]: the first entry is at 1 s"),
    ("t.yaml", "at: 0\nprompt: a\n", 1, "must be a list"),
]


@pytest.mark.parametrize("name,text,line,reason", BAD, ids=[f"{i}-{b[3][:24]}" for i, b in enumerate(BAD)])
def test_bad_timeline_exit_2_with_line(tmp_path, capsys, name, text, line, reason):
    tl = tmp_path / name
    tl.write_text(text)
    out = tmp_path / "out.mp4"
    rc = render_cli("--timeline", str(tl), "--seconds", "1", "-o", str(out), "--latents-out", str(tmp_path / "l.safetensors"))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{tl}:{line}: " in err and reason in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


def test_prompt_refused_by_model_names_its_entry(tmp_path, tiny_bundle):
    class Strict:  # a model whose encoder refuses some prompts (like the embedded model's grammar)
        def encode(self, prompt):
            if "purple" in prompt:
                raise ValueError("unknown colour 'purple'")
            return tiny_bundle.text_encoder.encode(prompt)

    strict = dataclasses.replace(tiny_bundle, text_encoder=Strict())
    text = "- at: 0\n  prompt: a red fox\n- at: 0.5\n  prompt: a purple fox\n"
    for timeline, line, index in [(text, 3, 1), (text.replace("red", "purple"), 1, 0)]:
        job = RenderJob(parse_timeline(timeline, "s.yaml"), 1.0, out=tmp_path / "o.mp4", source="s.yaml")
        with pytest.raises(TimelineError) as info:
            run_job(job, LocalBackend(strict))
        assert str(info.value).startswith(f"s.yaml:{line}: entry [{index}]: prompt ") and "unknown colour 'purple'" in str(info.value)
        assert list(tmp_path.iterdir()) == []


def test_failing_render_leaves_nothing(tmp_path, tiny_bundle):
    class Failing(LocalBackend):
        def open(self, prompt, overrides=None):
            stream = super().open(prompt, overrides)
            real, calls = stream.next, []

            def next_():
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("stage died")
                return real()
            stream.next = next_
            return stream

    job = RenderJob(single_prompt("a"), 1.0, out=tmp_path / "o.mp4", latents_out=tmp_path / "o.safetensors")
    with pytest.raises(RuntimeError, match="stage died"):
        run_job(job, Failing(tiny_bundle))
    assert list(tmp_path.iterdir()) == []


# --- units -----------------------------------------------------------------------------------------
def test_frame_mapping_and_sizes():
    wan = lambda l: 0 if l == 0 else 4 * l - 3
    assert [latent_for_video(v, wan) for v in (0, 1, 2, 5, 16, 17)] == [0, 1, 2, 2, 5, 5]
    tl = [TimelineEntry(0.0, "a"), TimelineEntry(1.0, "b"), TimelineEntry(1.05, "c"), TimelineEntry(9.0, "d", line=4, index=3)]
    switches, warnings = plan_switches(tl, 16.0, wan, 3, frame_count(5, 16.0))
    assert [(s.video_frame, s.latent_frame, s.chunk) for s in switches] == [(0, 0, 0), (16, 5, 2), (17, 5, 2), (144, 37, 13)]
    assert "same chunk" in warnings[0] and "past the end" in warnings[1]
    assert parse_output_size("256") == 256 and parse_output_size("640x360") == (640, 360)
    for bad in ("33x32", "x", "0", "12x", "1"):
        with pytest.raises(ValueError):
            parse_output_size(bad)
    assert output_size(32, 32, None) == (256, 256) and output_size(33, 17, None) == (232, 120)  # ×8, ×7: the page's size
    assert output_size(832, 480, None) == (832, 480) and output_size(300, 17, None) == (300, 18)
    assert output_size(832, 480, 256) == (256, 148) and output_size(32, 32, 100) == (100, 100)
    with pytest.raises(TimelineError, match=r"t.json:1: the timeline is empty"):
        parse_timeline("[]", "t.json", "json")
