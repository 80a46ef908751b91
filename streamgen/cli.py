"""The `streamgen` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from .bench.results import parse_hw


def _setting(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


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
    from .bench.results import save_result
    from .bench.setup import bench_setup_from_args
    from .bundles.options import precision_settings
    from .engine.stream import StreamConfig
    from .models.config import DiTConfig

    precision = precision_settings(args)
    setup = bench_setup_from_args(args)  # --model NAME --random-weights: that family's real architecture and settings
    if setup is not None:
        model, stream = setup
    else:
        dim = args.dim or 128
        model = DiTConfig(dim=dim, ffn_dim=args.ffn_dim or 2 * dim, num_heads=args.heads or 2, num_layers=args.layers or 2,
                          text_dim=32, text_len=16)
        sampler = args.sampler or "few_step"
        steps = args.steps or ([1000, 800, 600, 400, 200] if sampler == "rolling" else [1000, 750, 500, 250])
        policy = args.policy or ("rolling_anchor" if sampler == "rolling" else "ema_sink")
        stream = StreamConfig(*args.latent, policy=policy, policy_settings=dict(args.policy_setting), sampler=sampler,
                              schedule=args.schedule or "exact", steps=tuple(steps), batch_slots=not args.unbatched,
                              seed=args.seed)
    from .bench.setup import bench_decoder

    result = engine.run(engine.EngineBench(model, stream, args.chunks, args.threads, args.seed, bench_decoder(args),
                                           device=args.device, **precision), progress=not args.quiet)
    print(engine.render(result))
    tag = f"{args.model}-" if args.model else ""
    print(f"saved {save_result(result, args.out, f'engine-{tag}{stream.policy}-{stream.schedule}')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .backends.ray.cluster import ray_settings
    from .bundles.options import precision_settings
    from .serve.config import ServeConfig
    from .serve.limits import check_exposure, read_token
    from .serve.server import serve_forever

    precision = precision_settings(args)
    try:
        token = read_token(args.token_file)
        check_exposure(args.host, token)
    except ValueError as exc:
        print(f"streamgen serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)  # one line per ICE check otherwise
    given = {"model": args.model, "prompt": args.prompt, "model_dir": args.model_dir, "precision": precision or None}
    config = ServeConfig(host=args.host, port=args.port, max_sessions=args.max_sessions,
                         max_sessions_per_ip=args.max_sessions_per_ip, token=token, ice_servers=args.ice_server,
                         display_size=args.display_size, codec=args.codec, bitrate=args.bitrate, grace_s=args.grace,
                         threads=args.threads, backend=args.backend, scheduler=args.scheduler,
                         ray=ray_settings(args) if args.backend == "ray" else {},
                         **{k: v for k, v in given.items() if v is not None})
    try:
        asyncio.run(serve_forever(config))
    except OSError as exc:  # port in use, address not available
        print(f"streamgen: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from streamgen_client.cli import (
        run_args,  # installed with streamgen (and on its own: clients/python)
    )

    return run_args(args)


def build_parser() -> argparse.ArgumentParser:
    from .backends.names import SCHEDULERS
    from .backends.ray.cluster import add_ray_arguments
    from .bench.setup import add_bench_model_options
    from .bundles.models_cli import add_models_parser
    from .bundles.options import add_precision_arguments

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
    eng.add_argument("--sampler", help="few_step | rolling (default few_step; with --model the family's)")
    eng.add_argument("--schedule", help="exact | timestep-slot (default exact)")
    eng.add_argument("--unbatched", action="store_true", help="timestep-slot: run slots one by one")
    eng.add_argument("--steps", type=float, nargs="+")
    eng.add_argument("--chunks", type=int, default=1011)
    eng.add_argument("--threads", type=int)
    eng.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the DiT and the decoder run (default cpu)")
    eng.add_argument("--dim", type=int, help="DiT width (default 128; with --model the family's, or reduced keeping head size)")
    eng.add_argument("--ffn-dim", type=int)
    eng.add_argument("--heads", type=int, help="default 2; with --model dim / head size")
    eng.add_argument("--layers", type=int, help="default 2; with --model the family's (30 for Wan2.1-1.3B)")
    eng.add_argument("--latent", type=parse_hw, default=(8, 8), help="latent HxW (tokens/frame = H·W/4)")
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--out", type=Path)
    eng.add_argument("--quiet", action="store_true")
    add_bench_model_options(eng)
    add_precision_arguments(eng)
    eng.set_defaults(func=cmd_bench_engine)

    from .bench.pipeline import add_pipeline_bench_parser

    add_pipeline_bench_parser(bench_sub)
    from .bench.serve import add_serve_bench_parser

    add_serve_bench_parser(bench_sub)
    add_models_parser(sub)
    from .render.cli import add_render_parser

    add_render_parser(sub)
    from .train.cli import add_train_parser

    add_train_parser(sub)
    from .evaluation.cli import add_eval_parser

    add_eval_parser(sub)

    serve = sub.add_parser("serve", help="serve live streams over WebRTC (HTTP signaling, JSON control channel)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    serve.add_argument("--model", help="built-in bundle or model family (default: the bundle registry's default)")
    serve.add_argument("--model-dir", help="local files of a model family (see `streamgen models show NAME`)")
    serve.add_argument("--prompt", help="prompt for sessions whose offer carries none")
    serve.add_argument("--max-sessions", type=int, default=4)
    serve.add_argument("--max-sessions-per-ip", type=int, default=2)
    serve.add_argument("--token-file", metavar="FILE",
                       help="require 'Authorization: Bearer TOKEN' on the API, TOKEN being the file's first line "
                            "(default: $STREAMGEN_TOKEN if set, else no token; a non-loopback --host requires one)")
    serve.add_argument("--ice-server", nargs="+", action="extend", default=[], metavar="URL",
                       help="STUN/TURN servers: stun:HOST:PORT, turn:USER:PASSWORD@HOST:PORT (default none: loopback/LAN)")
    serve.add_argument("--display-size", type=int, default=256, help="upscale frames (nearest) to this longer side")
    serve.add_argument("--codec", choices=["vp8", "h264"], default="vp8", help="preferred video codec")
    serve.add_argument("--bitrate", type=int, help="video bits/s (default from size and fps)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds a dropped session waits for a reconnect")
    serve.add_argument("--threads", type=int, help="torch threads (default: every core for the engine loop; "
                                                   "cores / max sessions with --scheduler threads)")
    serve.add_argument("--scheduler", choices=SCHEDULERS, default="engine",
                       help="local backend: 'engine' (default) runs every session's DiT calls in one loop, batched; "
                            "'threads' gives each session its own generation thread")
    add_precision_arguments(serve)
    add_ray_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    client = sub.add_parser("client", help="watch a served stream: prompts on a schedule, acks, timing, MP4")
    client.add_argument("url", help="server, e.g. http://127.0.0.1:8080")
    client.add_argument("--prompt", help="initial prompt (default: the server's)")
    client.add_argument("--seconds", type=float, default=10.0, help="how long to watch")
    client.add_argument("--schedule", default="", help='prompt changes, e.g. "3:a blue square,6:a green circle"')
    client.add_argument("-o", "--out", help="record the received video to this MP4 file")
    client.add_argument("--token", help="bearer token, when the server has one")
    client.set_defaults(func=cmd_client)
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
