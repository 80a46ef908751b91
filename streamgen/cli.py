"""The `streamgen` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from .argparsing import CommandParser
from .bench.results import parse_hw
from .names import SAMPLERS, SCHEDULES

SERVE_DESCRIPTION = """Serve live streams over WebRTC: each browser or client session gets its own stream of the model,
prompts change live over a JSON control channel (HTTP signaling; the browser client is served at /)."""

SERVE_EXAMPLES = """examples:
  streamgen serve                                   # the embedded model on http://127.0.0.1:8080
  streamgen serve --model tiny-random --port 0      # a random-weight model on a free port
  streamgen serve --model self-forcing --model-dir ~/models/self-forcing --dtype bf16
  STREAMGEN_TOKEN=secret streamgen serve --host 0.0.0.0 --max-sessions 8
  streamgen client http://127.0.0.1:8080 --prompt "a red circle moving right" --seconds 5"""


def _setting(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def cmd_verify_fixture(args: argparse.Namespace) -> int:
    from .parity import verify_fixture

    status, reports = 0, []
    for path in args.dirs:
        try:
            report = verify_fixture(path, atol=args.atol, rtol=args.rtol)
        except (FileNotFoundError, ValueError, NotImplementedError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 2
            continue
        print(report.render())
        reports.append(report)
        status = status or (0 if report.passed else 1)
    rows = [row for report in reports for row in report.rows]
    worst = max((diff for _, diff, _ in rows), default=0.0)
    print(f"{len(reports)}/{len(args.dirs)} folders ran, {sum(ok for *_, ok in rows)}/{len(rows)} outputs passed, "
          f"max |Δ| {worst:.1e}")
    return status


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from .bench import engine
    from .bench.results import save_result
    from .bench.setup import bench_setup_from_args
    from .bundles.options import bundle_settings
    from .engine.stream import StreamConfig
    from .models.config import DiTConfig

    precision = {k: v for k, v in bundle_settings(args).items() if k != "decoder"}  # the decoder: bench_decoder
    setup = bench_setup_from_args(args)  # --model NAME: that family's real architecture and settings
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
    from .jobs.cli import serve_jobs_settings
    from .bundles.options import bundle_settings
    from .serve.config import ServeConfig
    from .serve.limits import check_exposure, read_token
    from .serve.server import serve_forever

    precision = bundle_settings(args)
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
                         recordings_dir=args.recordings_dir, offer_rate=args.offer_rate,
                         allowed_origins=tuple(args.allow_origin), publish_allow=tuple(args.publish_allow), ray=ray_settings(args) if args.backend == "ray" else {}, **serve_jobs_settings(args),
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
    from .bundles.family import BUNDLE_DECODERS
    from .bundles.models_cli import add_models_parser
    from .bundles.options import add_bundle_arguments
    from .datadir import user_data_dir

    parser = CommandParser(prog="streamgen", description=__doc__)  # every subcommand's parser is one too
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify-fixture", help="run golden fixture folders and compare every output")
    verify.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="fixture folders (each with meta.json and its inputs / expected outputs)")
    verify.add_argument("--atol", type=float, default=1e-4,
                        help="absolute tolerance of every compared output (default: %(default)g)")
    verify.add_argument("--rtol", type=float, default=1e-4,
                        help="relative tolerance of every compared output (default: %(default)g)")
    verify.set_defaults(func=cmd_verify_fixture)

    bench = sub.add_parser("bench", help="benchmarks that print and save JSON figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    eng = bench_sub.add_parser("engine", help="one stream on a random-weight DiT: latency, fps, KV bytes, flatness")
    eng.add_argument("--policy", help="cache policy (default ema_sink; rolling_anchor for --sampler rolling)")
    eng.add_argument("--policy-setting", type=_setting, action="append", default=[], metavar="KEY=VALUE")
    eng.add_argument("--sampler", choices=SAMPLERS, help="default few_step; with --model the family's")
    eng.add_argument("--schedule", choices=SCHEDULES, help="default exact; with --model the family's")
    eng.add_argument("--unbatched", action="store_true", help="timestep-slot: run slots one by one")
    eng.add_argument("--steps", type=float, nargs="+")
    eng.add_argument("--chunks", type=int, default=1011)
    eng.add_argument("--threads", type=int, help="torch threads (default: the cores idle at start)")
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
    add_bundle_arguments(eng, decoders=(*BUNDLE_DECODERS, "none"), default_decoder="vae")
    eng.set_defaults(func=cmd_bench_engine)

    from .bench.pipeline import add_pipeline_bench_parser

    add_pipeline_bench_parser(bench_sub)
    from .bench.serve import add_serve_bench_parser

    add_serve_bench_parser(bench_sub)
    from .bench.jobs import add_jobs_bench_parser

    add_jobs_bench_parser(bench_sub)
    from .bench.avatar import add_avatar_bench_parser

    add_avatar_bench_parser(bench_sub)
    add_models_parser(sub)
    from .render.cli import add_render_parser

    add_render_parser(sub)
    from .train.cli import add_train_parser

    add_train_parser(sub)
    from .evaluation.cli import add_eval_parser

    add_eval_parser(sub)

    serve = sub.add_parser("serve", help="serve live streams over WebRTC (HTTP signaling, JSON control channel)",
                           description=SERVE_DESCRIPTION, epilog=SERVE_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    serve.add_argument("--model", help="built-in bundle or model family (default: the bundle registry's default)")
    serve.add_argument("--model-dir", help="local files of a model family (see `streamgen models show NAME`)")
    serve.add_argument("--prompt", help="prompt for sessions whose offer carries none")
    serve.add_argument("--max-sessions", type=int, default=4,
                       help="live sessions at once; more are refused with HTTP 503 (default: %(default)s)")
    serve.add_argument("--max-sessions-per-ip", type=int, default=2,
                       help="live sessions one client address may hold (default: %(default)s)")
    serve.add_argument("--offer-rate", type=float, default=2.0, metavar="PER_S",
                       help="new sessions per second one client address may open (bursts of 10; over it: 429 with "
                            "Retry-After; default %(default)s)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="another site whose pages may call this API, e.g. https://app.example.com (repeatable; "
                            "the server's own page always may; other browser origins get 403)")
    serve.add_argument("--token-file", metavar="FILE",
                       help="require 'Authorization: Bearer TOKEN' on the API, TOKEN being the file's first line "
                            "(default: $STREAMGEN_TOKEN if set, else no token; a non-loopback --host requires one)")
    serve.add_argument("--ice-server", nargs="+", action="extend", default=[], metavar="URL",
                       help="STUN/TURN servers: stun:HOST:PORT, turn:USER:PASSWORD@HOST:PORT (default none: loopback/LAN)")
    serve.add_argument("--display-size", type=int, default=256, help="upscale frames (nearest) to this longer side")
    serve.add_argument("--codec", choices=["vp8", "h264"], default="vp8", help="preferred video codec")
    serve.add_argument("--bitrate", type=int, help="video bits/s (default from size and fps)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds a dropped session waits for a reconnect")
    serve.add_argument("--publish-allow", action="append", default=[], metavar="HOST[:PORT]",
                       help="an RTMP host POST /sessions/ID/publish may push to (repeatable; none: publishing is off)")
    serve.add_argument("--recordings-dir", type=Path, default=user_data_dir("recordings"), metavar="DIR",
                       help="where POST /sessions/ID/recording writes (default %(default)s)")
    serve.add_argument("--threads", type=int, help="torch threads (default: the cores idle at start for the engine loop; "
                                                   "that / max sessions with --scheduler threads)")
    serve.add_argument("--scheduler", choices=SCHEDULERS, default="engine",
                       help="local backend: 'engine' (default) runs every session's DiT calls in one loop, batched; "
                            "'threads' gives each session its own generation thread")
    add_bundle_arguments(serve)
    add_ray_arguments(serve)
    from .jobs.cli import add_jobs_parser, add_serve_jobs_arguments

    add_serve_jobs_arguments(serve)
    add_jobs_parser(sub)
    serve.set_defaults(func=cmd_serve)

    from streamgen_client.cli import (
        add_arguments as add_client_arguments,  # argparse only: no aiortc
    )

    client = sub.add_parser("client", help="watch a served stream: prompt changes at set times, acks, timing, MP4")
    add_client_arguments(client)
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
