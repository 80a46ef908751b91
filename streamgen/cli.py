"""The `streamgen` command."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def _setting(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from exc
    return h, w


def cmd_verify_fixture(args: argparse.Namespace) -> int:
    from .parity import verify_fixture

    status = 0
    for path in args.dirs:
        try:
            report = verify_fixture(path, atol=args.atol, rtol=args.rtol)
        except (FileNotFoundError, ValueError, NotImplementedError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 2
            continue
        print(report.render())
        status = status or (0 if report.passed else 1)
    return status


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from .bench import engine
    from .engine.stream import StreamConfig
    from .models.config import DiTConfig

    model = DiTConfig(dim=args.dim, ffn_dim=args.ffn_dim or 2 * args.dim, num_heads=args.heads, num_layers=args.layers,
                      text_dim=32, text_len=16)
    steps = args.steps or ([1000, 800, 600, 400, 200] if args.sampler == "rolling" else [1000, 750, 500, 250])
    policy = args.policy or ("rolling_anchor" if args.sampler == "rolling" else "ema_sink")
    stream = StreamConfig(*args.latent, policy=policy, policy_settings=dict(args.policy_setting), sampler=args.sampler,
                          schedule=args.schedule, steps=tuple(steps), batch_slots=not args.unbatched, seed=args.seed)
    result = engine.run(engine.EngineBench(model, stream, args.chunks, args.threads, args.seed), progress=not args.quiet)
    print(engine.render(result))
    out = args.out or Path("bench-results") / f"engine-{policy}-{args.schedule}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"saved {engine.save(result, out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify-fixture", help="run golden fixture folders and compare every output")
    verify.add_argument("dirs", nargs="+", type=Path)
    verify.add_argument("--atol", type=float, default=1e-4)
    verify.add_argument("--rtol", type=float, default=1e-4)
    verify.set_defaults(func=cmd_verify_fixture)

    bench = sub.add_parser("bench", help="benchmarks that print and save JSON figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="one stream on a random-weight DiT: latency, fps, KV bytes, flatness")
    eng.add_argument("--policy", help="cache policy (default ema_sink; rolling_anchor for --sampler rolling)")
    eng.add_argument("--policy-setting", type=_setting, action="append", default=[], metavar="KEY=VALUE")
    eng.add_argument("--sampler", default="few_step", help="few_step | rolling")
    eng.add_argument("--schedule", default="exact", help="exact | timestep-slot")
    eng.add_argument("--unbatched", action="store_true", help="timestep-slot: run slots one by one")
    eng.add_argument("--steps", type=float, nargs="+")
    eng.add_argument("--chunks", type=int, default=1011)
    eng.add_argument("--threads", type=int)
    eng.add_argument("--dim", type=int, default=128)
    eng.add_argument("--ffn-dim", type=int)
    eng.add_argument("--heads", type=int, default=2)
    eng.add_argument("--layers", type=int, default=2)
    eng.add_argument("--latent", type=_size, default=(8, 8), help="latent HxW (tokens/frame = H·W/4)")
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--out", type=Path)
    eng.add_argument("--quiet", action="store_true")
    eng.set_defaults(func=cmd_bench_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad names or settings: a clear message, no traceback
        print(f"streamgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
