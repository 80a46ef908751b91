"""`streamgen eval`: the non-learned checker over generated streams, one table per cache policy × sampler.

    streamgen eval --weights runs/x/embedded.safetensors --out runs/x/eval
    streamgen eval --weights W --policies window_sink ema_sink "window_sink:capacity_frames=12,sink_frames=3" \\
        --schedules exact timestep-slot --prompts all --frames 48 --switches 8 --long-frames 10000 --out DIR
    streamgen eval --model world --prompts 8 --out DIR      # ground truth through the same path: 100% by construction

What is measured (checker and thresholds: docs/world.md):

- Adherence. One stream per prompt (`--prompts all` = all 84 colour × shape × direction prompts; N = N of
  them, drawn with the seed), `--frames` frames each, from noise. Colour, shape and direction of every frame
  are scored against the prompt in force; the first chunk is warm-up and not counted.
- Switch latency. `--switches N` more streams whose prompt changes live at the chunk boundary nearest the
  middle (`Stream.set_prompt(at_frame=…)`); the kinds cycle colour-only, shape-only, direction-only, all.
  Median latency in frames and chunks per attribute, and per switch kind.
- Long stream (`--long-frames N`): one stream with the model's own policy and schedule; adherence,
  sharpness and mid fraction of the first vs the last 1,000 frames (or half the stream when shorter), and
  per-chunk time of the first vs the last 100 chunks (flatness: last / first = 1.0 is flat).

Policies: `NAME` or `NAME:KEY=VALUE,KEY=VALUE` (values in YAML). When NAME is the model's own policy, the
settings start from the model's (e.g. capacity_frames=9, sink_frames=0, rope=relative for the embedded model);
otherwise from the policy's reference defaults. The same seeds are used for every policy × schedule, so the
rows compare like with like.

Writes OUT/eval.json and OUT/eval.md (streamgen.world.report tables) and prints the Markdown.
Exit status: 0 done; 1 the report was written but some policy × schedule failed (listed in it);
2 bad arguments: unknown policy or setting, missing weights file (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..names import SCHEDULES
from .plan import parse_policy
from .report import write_outputs, write_report
from .run import evaluate_source
from .sources import ModelSource, WorldSource


def _prompts_arg(text: str) -> int | str:
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a count, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a count must be ≥ 0, got {n}")
    return n


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {n}")
        return n
    return parse


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eval` to a `streamgen` subparsers object; the parser's `func(args)` returns the exit code."""
    p = subparsers.add_parser("eval", help="score generated streams with the world checker, per cache policy × sampler",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("embedded", "world", "embedded-avatar"), default="embedded",
                       help="embedded: the shipped weights (default); world: rendered ground truth, the checker's "
                            "sanity baseline (policies and schedules are then labels only); embedded-avatar: the "
                            "avatar model on the avatar world's checker (--prompts = streams, --frames, --long-frames "
                            "for drift; docs/avatar_world.md)")
    p.add_argument("--weights", type=Path, metavar="FILE", help="a weights file of the --model (streamgen train's "
                                                                  "OUT/embedded.safetensors or OUT/embedded_avatar.safetensors)")
    p.add_argument("--policies", nargs="+", metavar="NAME[:K=V,…]",
                   help="cache policies to compare (default: the model's own), e.g. window_sink ema_sink "
                        "window_sink:capacity_frames=12,sink_frames=3")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=["exact"],
                   help="few-step schedules to compare (default exact)")
    p.add_argument("--steps", type=float, nargs="+", metavar="N|T",
                   help="one integer: that many evenly spaced denoising steps from t=1000 (the model's own list when "
                        "the count matches; default: the model's, 4); several values: the timesteps themselves")
    p.add_argument("--prompts", type=_prompts_arg, default="all",
                   help="'all' (every colour × shape × direction, 84 streams) or N of them drawn with the seed")
    p.add_argument("--frames", type=_count(6), default=48, help="frames per stream (default 48)")
    p.add_argument("--switches", type=_count(0), default=8,
                   help="streams with a live prompt change per policy × schedule, cycling colour-only, shape-only, "
                        "direction-only, all (default 8)")
    p.add_argument("--long-frames", type=_count(0), default=0,
                   help="frames of one long stream with the model's own policy (0: none; e.g. 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_count(1), default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/eval.json and DIR/eval.md")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no Markdown on stdout")
    p.set_defaults(func=cmd_eval)
    return p


def load_source(args: argparse.Namespace):
    if args.model == "world":
        if args.weights is not None:
            raise ValueError("--weights is the file of a model: pass it with --model embedded, not world")
        return WorldSource()
    from ..bundles.embedded import WEIGHTS_PATH, embedded_bundle

    path = args.weights or WEIGHTS_PATH
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}" + (
            "" if args.weights else " (no embedded weights are shipped yet; pass --weights FILE)")
            + "; train one with `streamgen train --out DIR` and pass --weights DIR/embedded.safetensors")
    return ModelSource(embedded_bundle(path), f"embedded ({path})")


def cmd_eval_avatar(args: argparse.Namespace) -> int:
    """The avatar model's table: lip sync, lag, identity, eyes, jitter; drift over --long-frames."""
    import time

    import torch

    from ..bundles.embedded_avatar import WEIGHTS_PATH, embedded_avatar_bundle
    from ..train.avatar_eval import evaluate_avatar
    from .avatar import evaluate_long, report_markdown

    torch.set_num_threads(args.threads)
    path = args.weights or WEIGHTS_PATH
    if not Path(path).is_file():
        print(f"streamgen eval: error: weights file not found: {path}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    bundle = embedded_avatar_bundle(path)
    clips = 16 if args.prompts == "all" else args.prompts
    doc = evaluate_avatar(bundle, clips=clips, frames=args.frames, seed=args.seed)
    doc["settings"] = {"weights": str(path), "frames": args.frames, "seed": args.seed}
    if args.long_frames:
        doc["long"] = evaluate_long(bundle, args.long_frames, seed=args.seed)
    doc["settings"]["seconds"] = time.perf_counter() - start
    json_path, md_path, md = write_report(doc, report_markdown(doc), args.out, "eval")
    if not args.quiet:
        print(md)
    print(f"wrote {json_path} and {md_path} ({doc['settings']['seconds']:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.model == "embedded-avatar":
        return cmd_eval_avatar(args)
    try:
        specs = [parse_policy(p) for p in args.policies or []]
        import torch

        torch.set_num_threads(args.threads)
        source = load_source(args)
        doc = evaluate_source(source, specs, args.schedules, steps=args.steps, prompts=args.prompts, frames=args.frames,
                              switches=args.switches, long_frames=args.long_frames, seed=args.seed,
                              threads=args.threads, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"streamgen eval: error: {exc}", file=sys.stderr)
        return 2
    json_path, md_path, md = write_outputs(doc, args.out)
    if not args.quiet:
        print(md)
    print(f"wrote {json_path} and {md_path} ({doc['settings']['seconds']:.0f} s)")
    if doc["failures"]:
        print(f"streamgen eval: {len(doc['failures'])} policy × sampler combination(s) failed; see {md_path}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m streamgen.evaluation.cli …`: the same as `streamgen eval …`."""
    parser = argparse.ArgumentParser(prog="streamgen")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_eval_parser", "cmd_eval", "load_source", "main"]
