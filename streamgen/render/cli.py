"""`streamgen render`: a prompt or a timeline of prompts → an H.264 MP4 (and optionally the latents);
for an audio-driven model, speech and a face picture → an H.264 + AAC MP4.

    streamgen render --prompt "a red fox" --seconds 10 -o fox.mp4
    streamgen render --timeline story.yaml --seconds 30 --size 512 -o story.mp4 --latents-out story.safetensors
    streamgen render --timeline story.yaml --backend ray --ray-stages 2 -o story.mp4
    streamgen render --model embedded-avatar --audio speech.wav --reference face.png -o talk.mp4

Audio-driven models (embedded-avatar): --audio is required, the video is as long as the audio (to the
frame) and carries it as its sound track, frame n beside the audio that drove it; --reference defaults
to a white disc on black (a white round face); a prompt, timeline or --seconds is ignored with a warning.

Exit status: 0 done; 2 bad arguments, timeline or settings (nothing written); 1 the render failed
(nothing written); 130 interrupted (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from ..argparsing import CommandParser
from ..names import SCHEDULES

# Only argparse-level imports here: building the `streamgen` parser must not import torch.

DEFAULT_SECONDS = 5.0


def _size_arg(text: str) -> int | tuple[int, int]:
    from .writer import parse_output_size

    try:
        return parse_output_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _output_arg(text: str):
    from .writer import parse_output

    try:
        return parse_output(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setting(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value
    return parse


def add_render_parser(subparsers) -> argparse.ArgumentParser:
    """Add `render` to a `streamgen` subparsers object; the parser's `func(args)` returns the exit code."""
    from ..backends.ray.cluster import (
        add_ray_arguments,  # light: no torch, no ray import
    )
    from ..bundles.options import add_bundle_arguments  # light: no torch
    from .writer import (  # light: torch / av are imported where used
        DEFAULT_CRF,
        DEFAULT_PRESET,
        SCALE_FILTERS,
        X264_PRESETS,
    )

    p = subparsers.add_parser("render", help="render a prompt or a prompt timeline to an MP4 (batch job)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to render")
    what.add_argument("--prompt", help="the prompt (with --timeline: the opening prompt when the timeline starts after 0)")
    what.add_argument("--timeline", type=Path, metavar="FILE",
                      help="JSON or YAML list of {at: seconds, prompt, transition?}; transition: recache, blend or "
                           "{kind: blend, chunks: 4, interpolation: slerp}")
    what.add_argument("--seconds", type=_positive(float),
                      help=f"length in model time: round(seconds × model fps) frames are written (default {DEFAULT_SECONDS:g}; "
                           "an audio-driven model: the audio's length)")
    what.add_argument("--audio", type=Path, metavar="SPEECH.wav",
                      help="an audio-driven model's speech: integer-PCM WAV, any rate (resampled to 16 kHz), channels averaged")
    what.add_argument("--reference", type=Path, metavar="FACE.png",
                      help="an audio-driven model's face picture, PNG or JPEG (default: a white disc on black, a white round face)")
    what.add_argument("--seed", type=int, help="noise seed (default: the model's, 0)")
    what.add_argument("--model", help="built-in bundle or model family (default: the registry's default)")
    what.add_argument("--model-dir", help="local files of a model family (see `streamgen models show NAME`)")
    what.add_argument("--schedule", choices=SCHEDULES,
                      help="default: the model's (ray tpp: timestep-slot); the same seed gives the same latents per schedule")
    what.add_argument("--unbatched", action="store_true", help="timestep-slot: run the slots one by one (same latents)")
    what.add_argument("--policy", help="cache policy (default: the model's; window_sink, ema_sink, deep_sink, full, rolling_anchor)")
    what.add_argument("--policy-setting", type=_setting, action="append", default=[], metavar="KEY=VALUE")
    what.add_argument("--threads", type=_positive(int), help="torch threads (default: the cores idle at start, see engine/threads.py)")

    out = p.add_argument_group("output")
    out.add_argument("-o", "--out", type=_output_arg, metavar="OUT",
                     help="OUT.mp4 (H.264 MP4), OUT.m3u8 (HLS: MPEG-TS segments beside the playlist) or "
                          "rtmp[s]://host/app/key (pushed live, in real time)")
    out.add_argument("--latents-out", type=Path, metavar="FILE.safetensors",
                     help='also save the latents of the frames written: key "latents" [1, F, C, h, w] + metadata '
                          '(model, seed, timeline JSON, …)')
    out.add_argument("--fps", type=_positive(float), help="container frame rate (default: the model's; frame count is unchanged)")
    out.add_argument("--size", type=_size_arg, metavar="N|WxH",
                     help="output size: longer side N (even; the other side keeps the aspect, rounded to even) or "
                          "WxH (both even); default: the model's frames, small ones (the embedded model's 32×32) at the whole multiple reaching 256 px, as the page shows them")
    out.add_argument("--scale-filter", choices=SCALE_FILTERS, default="auto",
                     help="auto (default): nearest for pixel art (frames ≤ 128 px, whole-number upscales), "
                          "area when shrinking, bicubic when enlarging")
    rate = out.add_mutually_exclusive_group()
    rate.add_argument("--crf", type=int, default=DEFAULT_CRF,
                      help=f"x264 constant quality, 0 (lossless) … 51 (default {DEFAULT_CRF}: visually lossless)")
    rate.add_argument("--bitrate", type=_positive(int), help="average bits/s instead of --crf (peaks capped at 1.5×)")
    out.add_argument("--preset", default=DEFAULT_PRESET, choices=X264_PRESETS, metavar="PRESET",
                     help=f"x264 speed / size trade-off: {', '.join(X264_PRESETS)} (default {DEFAULT_PRESET})")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    add_bundle_arguments(p)
    add_ray_arguments(p)
    p.set_defaults(func=cmd_render)
    return p


def _error(message: str) -> int:
    print(f"streamgen render: error: {message}", file=sys.stderr)
    return 2


def job_from_args(args: argparse.Namespace):
    """The `RenderJob` of parsed `render` arguments (raises TimelineError / ValueError); the audio and
    reference files are read here, so a bad one is refused before a model is loaded."""
    from .job import RenderJob, read_drive
    from .timeline import load_timeline, with_opening

    entries = load_timeline(args.timeline) if args.timeline is not None else []
    source = str(args.timeline) if args.timeline is not None else "--prompt"
    if not 0 <= args.crf <= 51:
        raise ValueError(f"--crf must be 0…51, got {args.crf}")
    if args.reference is not None and args.audio is None:
        raise ValueError("--reference is an audio-driven model's face and goes with --audio SPEECH.wav")
    # no text at all may suit an audio-driven model: only a built-in can be one (families load for minutes,
    # so theirs is said now), and `job_frames` says what is missing once the model is known
    untexted = args.prompt is None and not entries and (args.model_dir is None or args.audio is not None)
    seconds = args.seconds if args.seconds is not None or args.audio is not None else DEFAULT_SECONDS
    return RenderJob(timeline=[] if untexted else with_opening(entries, args.prompt, source), seconds=seconds, out=args.out,
                     latents_out=args.latents_out, seed=args.seed, fps=args.fps, size=args.size,
                     scale_filter=args.scale_filter, crf=args.crf, bitrate=args.bitrate, preset=args.preset,
                     schedule=args.schedule, policy=args.policy, policy_settings=dict(args.policy_setting),
                     batch_slots=False if args.unbatched else None, source=source,
                     drive=read_drive(args.audio, args.reference) if args.audio is not None else None)


def refuse_family_drive(args: argparse.Namespace) -> None:
    """--audio with --model-dir: refused before the family's long load. No family streams from audio yet:
    an s2v one (live-avatar) is refused by `require_streamable`, with its reason; any other takes text."""
    if args.audio is None or args.model_dir is None:
        return
    from ..bundles.builtins import DEFAULT_MODEL
    from ..bundles.family import load_family_config

    name = args.model or DEFAULT_MODEL
    load_family_config(name).require_streamable("render")
    raise ValueError(f"--audio drives an audio-driven model (embedded-avatar); the family {name} is a text model: "
                     "drop --audio and give --prompt or --timeline")


def cmd_render(args: argparse.Namespace) -> int:
    from .timeline import TimelineError

    if args.out is None and args.latents_out is None:
        return _error("nothing to write: give -o OUT.mp4 and/or --latents-out FILE.safetensors")
    try:
        job = job_from_args(args)
        refuse_family_drive(args)
    except (TimelineError, ValueError) as exc:
        return _error(str(exc))

    import torch
    from tqdm import tqdm

    from ..backends.ray.cluster import backend_from_args
    from ..bundles.bundle import DEFAULT_MODEL, load_bundle
    from ..bundles.options import bundle_settings
    from ..engine.threads import default_threads
    from .job import job_frames, require_backend, run_job

    torch.set_num_threads(args.threads or default_threads())
    backend = None
    bar = None
    try:
        bundle = load_bundle(args.model or DEFAULT_MODEL, args.model_dir, **bundle_settings(args))
        total = job_frames(job, bundle)  # inputs that do not suit the model: refused before a backend starts
        require_backend(job, getattr(args, "backend", "local"))
        backend = backend_from_args(args, bundle, max_streams=1)
        bar = tqdm(total=total, unit="frame", desc="render", disable=args.quiet,
                   dynamic_ncols=True, file=sys.stderr)

        def progress(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        def warn(message: str) -> None:  # before the render starts: an entry past the end, two on one chunk
            tqdm.write(f"streamgen render: warning: {message}", file=sys.stderr)

        result = run_job(job, backend, progress=progress, warn=warn)
    except (TimelineError, ValueError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        print("streamgen render: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # a stream or encoder failure: said plainly, partial files already removed
        print(f"streamgen render: failed: {type(exc).__name__}: {exc}; nothing written", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
        if backend is not None and hasattr(backend, "shutdown"):
            backend.shutdown()
    for s in result.switches[1:]:
        landed = f"frame {s.landed} ({s.landed / result.model_fps:.3f} s)" if s.landed is not None else "not reached"
        kind = s.entry.transition.kind if s.entry.transition else result.config["transition"]["kind"]
        print(f"  {s.entry.at:g} s {s.entry.prompt!r} ({kind}) → {landed}")
    if result.latent_shape is not None:
        print(f"  latents {list(result.latent_shape)} → {result.latents_out}")
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m streamgen.render.cli …` (the same as `streamgen render …`)."""
    parser = CommandParser(prog="streamgen")
    sub = parser.add_subparsers(dest="command", required=True)
    add_render_parser(sub)
    args = parser.parse_args(["render", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
