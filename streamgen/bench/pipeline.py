"""`streamgen bench pipeline`: the Ray timestep pipeline against the in-process engine.

For each stage count (default 1 and 2) it opens `--sessions` streams on one pipeline, runs warm-up
chunks, then measures at steady state:
- throughput: chunks/s and latent frames/s over all sessions (and the in-process timestep-slot
  stream on the same model and thread count, for reference);
- per-stage busy %: time a stage spent inside `tick` over the wall time of the window;
- overhead = wall − compute per tick, as a share of wall, where compute is the tick's critical
  path: max(stage computes, last stage + decoder) — what a zero-cost transport would take (goal
  ≤ 5% at steady state);
- per-hop latency: driver → stage dispatch (for stage s > 0 this includes pulling stage s−1's
  latents out of the object store), last stage → decoder (a chained hop inside one tick), decoder
  → driver;
- bytes per hop per tick (latents leaving each stage; contexts travel once per prompt).
`--transport` adds the probe behind the transport choice: a chunk-sized payload through two chained
actor calls as numpy, as a pickled torch tensor, and through a Ray Compiled Graph.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .results import parse_hw, save_result

MB = 1024 * 1024


def random_bundle(dim: int = 256, heads: int = 4, layers: int = 4, latent: tuple[int, int] = (16, 16),
                  policy: str = "ema_sink", seed: int = 0):
    """A seeded random-weight Wan DiT bundle of a given size (built identically in every actor)."""
    import torch  # lazy: the CLI's parser imports this module

    from ..bundles.bundle import ModelBundle
    from ..engine.stream import StreamConfig
    from ..models.config import DiTConfig
    from ..models.decoders import LatentPreviewDecoder
    from ..models.dit import WanDiT
    from ..models.random_text import RandomTextEncoder

    torch.manual_seed(seed)
    cfg = DiTConfig(dim=dim, ffn_dim=2 * dim, num_heads=heads, num_layers=layers, text_dim=32, text_len=16)
    return ModelBundle(name=f"random-d{dim}-l{layers}-h{heads}-{latent[0]}x{latent[1]}", dit=WanDiT(cfg).eval(),
                       text_encoder=RandomTextEncoder(cfg.text_len, cfg.text_dim),
                       decoder=lambda: LatentPreviewDecoder(cfg.in_dim, scale=4),
                       stream=StreamConfig(*latent, policy=policy, schedule="timestep-slot"), fps=16.0)


def _recipe(args: argparse.Namespace):
    if args.model:
        return args.model
    return functools.partial(random_bundle, args.dim, args.heads, args.layers, tuple(args.latent), args.policy, args.seed)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1)))]


def run_local(bundle, overrides: dict[str, Any], chunks: int, warmup: int, threads: int) -> dict[str, Any]:
    """The in-process timestep-slot stream (batched) on the same model: the reference throughput."""
    import torch  # lazy: the CLI's parser imports this module

    from ..engine.stream import Stream

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = replace(bundle.stream, **{**overrides, "schedule": "timestep-slot"})
        stream = Stream(bundle.dit, bundle.text_encoder, cfg, "a benchmark prompt")
        for _ in range(warmup):
            stream.next_chunk()
        t0 = time.perf_counter()
        for _ in range(chunks):
            latents = stream.next_chunk().latents
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "chunk_ms": 1e3 * wall / chunks, "chunks_per_s": chunks / wall,
            "latent_frames_per_s": chunks * latents.shape[1] / wall}


def run_pipeline(bundle, recipe, stages: int, sessions: int, chunks: int, warmup: int, overrides: dict[str, Any],
                 cpus_per_stage: float, threads: int, batched: bool = True) -> dict[str, Any]:
    """One pipeline with `stages` stages and `sessions` streams, each driven by its own thread."""
    from ..backends.ray.pipeline import Pipeline
    from ..backends.ray.pipeline_config import PipelineConfig, split_steps
    from ..backends.ray.pipeline_stream import PipelineFrameStream

    cfg = PipelineConfig(model=recipe, stages=stages, stage_resources={"num_cpus": cpus_per_stage}, threads=threads,
                         decoder_resources={"num_cpus": 0.05}, batched=batched, max_sessions=max(16, sessions))
    t0 = time.perf_counter()
    pipe = Pipeline(cfg, bundle.dit.cfg)
    start_s = time.perf_counter() - t0
    try:
        streams = [PipelineFrameStream(pipe, bundle, f"benchmark prompt {i}", {**overrides, "seed": i}) for i in range(sessions)]
        first = time.perf_counter()
        for _ in range(warmup):
            for s in streams:
                s.next()
        first_chunks_s = time.perf_counter() - first
        ticks_before = len(pipe.timeline)
        per_chunk: list[float] = []
        last: list = []

        def drive(stream) -> None:  # one thread per session, as the server runs them
            for _ in range(chunks):
                c0 = time.perf_counter()
                chunk = stream.next()
                per_chunk.append(time.perf_counter() - c0)
            last.append(chunk)

        workers = [threading.Thread(target=drive, args=(s,)) for s in streams]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        chunk = last[0]
        ticks = list(pipe.timeline)[ticks_before:]
        frames = chunk.latents.shape[1]
        latent_bytes = chunk.latents.numel() * chunk.latents.element_size()
        k = len(streams[0].stream.timesteps)
        for s in streams:
            s.close()
    finally:
        pipe.shutdown()
    tick_wall = [t["wall_s"] for t in ticks]
    critical = []
    for t in ticks:
        comp = [st["compute_s"] for st in t["stages"]]
        critical.append(max(max(comp[:-1], default=0.0), comp[-1] + t["decoder"]["compute_s"]))
    overhead = [w - c for w, c in zip(tick_wall, critical)]
    busy = [sum(t["stages"][i]["compute_s"] for t in ticks) / wall for i in range(stages)]
    dispatch = [[1e3 * (t["stages"][i]["recv"] - t["submit"]) for t in ticks] for i in range(stages)]
    to_decoder = [1e3 * (t["decoder"]["recv"] - t["stages"][-1]["end"]) for t in ticks]
    back = [1e3 * (t["done"] - t["decoder"]["end"]) for t in ticks]
    hop_bytes = [statistics.mean(t["stages"][i]["out_bytes"] for t in ticks) for i in range(stages)]
    total_chunks = chunks * len(streams)
    return {
        "stages": stages, "sessions": sessions, "steps": k, "steps_per_stage": [len(p) for p in split_steps(k, stages)],
        "start_s": start_s, "warmup_s": first_chunks_s,
        "chunks_per_s": total_chunks / wall, "latent_frames_per_s": total_chunks * frames / wall,
        "video_frames_per_s_at_4x": 4 * total_chunks * frames / wall,
        "chunk_ms_p50": 1e3 * statistics.median(per_chunk), "chunk_ms_p95": 1e3 * _pct(per_chunk, 0.95),
        "tick_ms_mean": 1e3 * statistics.mean(tick_wall), "tick_compute_ms_mean": 1e3 * statistics.mean(critical),
        "overhead_ms_per_tick": 1e3 * statistics.mean(overhead),
        "overhead_pct": 100 * sum(overhead) / sum(tick_wall),
        "overhead_pct_p50_tick": 100 * statistics.median(o / w for o, w in zip(overhead, tick_wall)),
        "stage_busy_pct": [100 * b for b in busy],
        "stage_compute_ms_mean": [1e3 * statistics.mean(t["stages"][i]["compute_s"] for t in ticks) for i in range(stages)],
        "decoder_compute_ms_mean": 1e3 * statistics.mean(t["decoder"]["compute_s"] for t in ticks),
        "hop_ms": {"driver_to_stage_p50": [statistics.median(d) for d in dispatch],
                   "last_stage_to_decoder_p50": statistics.median(to_decoder),
                   "decoder_to_driver_p50": statistics.median(back)},
        "bytes_per_hop_per_tick": hop_bytes, "latent_bytes_per_chunk": latent_bytes,
        "forwards_per_tick": [statistics.mean(t["stages"][i]["forwards"] for t in ticks) for i in range(stages)],
        "sessions_per_tick": statistics.mean(t["sessions"] for t in ticks),
        "ticks": len(ticks),
    }


def transport_probe(payload_bytes: list[int], repeats: int = 40) -> dict[str, Any]:
    """Two chained actor calls (A → B → driver) with a payload: numpy vs torch vs a Compiled Graph."""
    import numpy as np
    import ray
    import torch  # lazy: the CLI's parser imports this module

    os.environ.setdefault("RAY_CGRAPH_teardown_timeout", "2")

    @ray.remote(num_cpus=0)
    class Hop:
        def __init__(self) -> None:
            torch.set_num_threads(1)

        def f(self, x):
            return x

    a, b = Hop.remote(), Hop.remote()
    ray.get([a.f.remote(0), b.f.remote(0)], timeout=60)
    out: dict[str, Any] = {"repeats": repeats, "two_hop_ms_p50": {}}
    for n in payload_bytes:
        arr = np.random.default_rng(0).standard_normal(n // 4).astype(np.float32)
        row = {}
        for name, payload in (("numpy", arr), ("torch", torch.from_numpy(arr.copy()))):
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                ray.get(b.f.remote(a.f.remote(payload)), timeout=60)
                ts.append(time.perf_counter() - t0)
            row[name] = 1e3 * statistics.median(ts[5:])
        out["two_hop_ms_p50"][str(n)] = row
    ts_trivial = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get(a.f.remote(0), timeout=60)
        ts_trivial.append(time.perf_counter() - t0)
    out["trivial_call_ms_p50"] = 1e3 * statistics.median(ts_trivial)
    try:  # compiled graph: few executions only (teardown hangs after ≥20 with ≥1 MB payloads, spec §2)
        from ray.dag import InputNode

        with InputNode() as inp:
            dag = b.f.bind(a.f.bind(inp))
        cdag = dag.experimental_compile()
        for n in payload_bytes:
            arr = np.random.default_rng(0).standard_normal(n // 4).astype(np.float32)
            ts = []
            for _ in range(min(repeats, 15)):
                t0 = time.perf_counter()
                ray.get(cdag.execute(arr), timeout=60)
                ts.append(time.perf_counter() - t0)
            out["two_hop_ms_p50"][str(n)]["compiled_graph"] = 1e3 * statistics.median(ts[3:])
        cdag.teardown(kill_actors=True)
    except Exception as exc:  # report, don't fail the benchmark
        out["compiled_graph_error"] = f"{type(exc).__name__}: {exc}"
        for h in (a, b):
            ray.kill(h)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch  # lazy: the CLI's parser imports this module

    from ..backends.ray.cluster import connect

    recipe = _recipe(args)
    from ..backends.ray.wire import build_bundle

    bundle = build_bundle(recipe)
    overrides: dict[str, Any] = {"schedule": "timestep-slot"}
    if args.steps:
        overrides["steps"] = tuple(args.steps)
    connect(args.ray_address, num_cpus=args.num_cpus, object_store_memory=256 * MB, log_to_driver=False)
    result: dict[str, Any] = {
        "benchmark": "pipeline",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "ray": ray.__version__, "load_avg": os.getloadavg()},
        "model": {"name": bundle.name, **bundle.dit.cfg.to_dict()},
        "stream": {"latent": [bundle.stream.latent_height, bundle.stream.latent_width], "policy": bundle.stream.policy,
                   "steps": list(overrides.get("steps", bundle.stream.steps)), "chunk_frames": bundle.stream.chunk_frames},
        "threads_per_stage": args.threads, "cpus_per_stage": args.cpus_per_stage, "sessions": args.sessions,
        "chunks": args.chunks, "warmup": args.warmup, "overhead_goal": "≤ 5% of wall at steady state",
    }
    try:
        if not args.no_local:
            result["local"] = run_local(bundle, overrides, args.chunks, args.warmup, args.threads)
        result["runs"] = []
        for stages in args.stages:
            if not args.quiet:
                print(f"bench pipeline: {stages} stage(s), {args.sessions} session(s)…", flush=True)
            result["runs"].append(run_pipeline(bundle, recipe, stages, args.sessions, args.chunks, args.warmup, overrides,
                                               args.cpus_per_stage, args.threads, not args.unbatched))
        if args.transport:
            chunk_bytes = result["runs"][0]["latent_bytes_per_chunk"] if result["runs"] else 12 * 1024
            result["transport"] = transport_probe(sorted({chunk_bytes, 600 * 1024}))
    finally:
        if not args.keep_ray:
            ray.shutdown()
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']['name']}  steps {result['stream']['steps']}  sessions {result['sessions']}  "
             f"threads/stage {result['threads_per_stage']}"]
    if "local" in result:
        loc = result["local"]
        lines.append(f"  in-process timestep-slot: {loc['chunks_per_s']:.1f} chunks/s  ({loc['chunk_ms']:.1f} ms/chunk)")
    for r in result.get("runs", []):
        lines.append(f"  {r['stages']} stage(s) {r['steps_per_stage']}: {r['chunks_per_s']:.1f} chunks/s "
                     f"({r['latent_frames_per_s']:.1f} latent frames/s), chunk p50 {r['chunk_ms_p50']:.1f} ms p95 "
                     f"{r['chunk_ms_p95']:.1f} ms")
        lines.append(f"    tick {r['tick_ms_mean']:.1f} ms = compute {r['tick_compute_ms_mean']:.1f} + overhead "
                     f"{r['overhead_ms_per_tick']:.2f} ms ({r['overhead_pct']:.1f}% of wall; goal ≤ 5%)")
        lines.append("    stage busy " + ", ".join(f"{b:.0f}%" for b in r["stage_busy_pct"])
                     + f"; bytes/hop/tick {[int(b) for b in r['bytes_per_hop_per_tick']]}; sessions/tick "
                     f"{r['sessions_per_tick']:.2f}")
        h = r["hop_ms"]
        lines.append(f"    hop ms p50: driver→stage {[round(x, 2) for x in h['driver_to_stage_p50']]}, last stage→decoder "
                     f"{h['last_stage_to_decoder_p50']:.2f}, decoder→driver {h['decoder_to_driver_p50']:.2f}")
    if "transport" in result:
        for n, row in result["transport"]["two_hop_ms_p50"].items():
            lines.append(f"  transport {int(n) // 1024} KB, 2 chained hops p50: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()))
    return "\n".join(lines)


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    result = run(args)
    print(render(result))
    print(f"saved {save_result(result, args.out, 'pipeline')}")
    return 0


def add_pipeline_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register `bench pipeline` on the `bench` command's subparsers."""
    p = bench_subparsers.add_parser("pipeline", help="Ray timestep pipeline: throughput (1 vs 2 stages), busy %%, "
                                                     "overhead, per-hop latency and bytes")
    p.add_argument("--model", help="a bundle name (default: a seeded random DiT of --dim/--layers/--heads/--latent)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--latent", type=parse_hw, default=(16, 16), help="latent HxW")
    p.add_argument("--policy", default="ema_sink")
    p.add_argument("--steps", type=float, nargs="+", help="denoising steps (default: the bundle's, 4)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--chunks", type=int, default=40, help="measured chunks per session")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage actor (and the in-process reference)")
    p.add_argument("--cpus-per-stage", type=float, default=0.9)
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance (default: all)")
    p.add_argument("--unbatched", action="store_true", help="stages run their slots one forward each")
    p.add_argument("--transport", action="store_true", help="also probe numpy vs torch vs compiled-graph hops")
    p.add_argument("--no-local", action="store_true", help="skip the in-process reference")
    p.add_argument("--ray-address", default="local")
    p.add_argument("--keep-ray", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench_pipeline)
    return p


def main(argv: list[str] | None = None) -> int:  # python -m streamgen.bench.pipeline (until the CLI wires it)
    parser = argparse.ArgumentParser(prog="streamgen bench")
    add_pipeline_bench_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["pipeline", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
