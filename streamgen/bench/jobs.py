"""`streamgen bench jobs`: what durable render jobs cost and gain on one node.

- checkpoint cost per chunk: one job checkpointing after every chunk (ms and bytes, from its events);
- resume: loading that checkpoint and restoring a fresh stream from it;
- throughput: N identical-length renders queued on one scheduler running C at once (the engine loop
  batches their DiT calls) vs the same renders run one by one; frames of video per second of wall time.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .results import save_result


def _spec(index: int, seconds: float):
    from ..jobs.spec import parse_spec

    return parse_spec({"id": f"bench-{index}", "prompt": "a red circle moving right", "seconds": seconds,
                       "seed": index})


def _run_queue(backend, folder: Path, renders: int, seconds: float, concurrency: int, every: int) -> float:
    """Wall seconds for `renders` jobs through a scheduler running `concurrency` at once."""
    from ..jobs.scheduler import JobScheduler, SchedulerConfig
    from ..jobs.store import JobStore

    store = JobStore(folder)
    scheduler = JobScheduler(store, backend, SchedulerConfig(concurrency, max_queued=renders, checkpoint_every=every))
    t0 = time.perf_counter()
    for i in range(renders):
        job_id, spec = _spec(i, seconds)
        scheduler.submit(spec, job_id)
    scheduler.start()
    try:
        while any(store.get(f"bench-{i}").state not in ("succeeded", "failed", "cancelled") for i in range(renders)):
            time.sleep(0.05)
    finally:
        scheduler.stop()
    wall = time.perf_counter() - t0
    failed = [j.error for j in (store.get(f"bench-{i}") for i in range(renders)) if j.state != "succeeded"]
    store.close()
    if failed:
        raise RuntimeError(f"bench jobs: a render failed: {failed[0]}")
    return wall


def _checkpoint_costs(backend, folder: Path, seconds: float) -> dict[str, Any]:
    """One job checkpointing after every chunk, then its last checkpoint loaded and restored."""
    from ..jobs import checkpoint, runner
    from ..jobs.store import JobStore

    store = JobStore(folder)
    job_id, spec = _spec(0, seconds)
    job = store.set_state(store.submit(spec, round(seconds * backend.bundle.fps), job_id)[0].id, "running")
    stop = threading.Event()

    def progress_then_stop() -> None:  # stop at about half way, leaving a checkpoint to resume from
        while not stop.is_set():
            current = store.get(job_id)
            if current.frames_done >= current.frames_total // 2:
                stop.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=progress_then_stop, daemon=True)
    watcher.start()
    try:
        runner.run(job, store, backend, stop, threading.Event(), checkpoint_every=1)
    except runner.Interrupted:
        pass
    stop.set()
    watcher.join()
    saved = [e.data for e in store.events(job_id) if e.kind == "checkpoint"]
    path = store.job_dir(job_id) / runner.CHECKPOINT
    t0 = time.perf_counter()
    loaded = checkpoint.load(path)
    rj = runner.render_job(spec, backend.bundle)
    fs = backend.open(rj.timeline[0].prompt, rj.overrides(backend.bundle.stream))
    try:
        checkpoint.restore(fs, loaded.stream)
        resume_ms = 1000 * (time.perf_counter() - t0)
    finally:
        backend.close(fs)
    store.close()
    ms = [c["ms"] for c in saved]
    return {"checkpoints": len(saved), "checkpoint_ms_p50": statistics.median(ms), "checkpoint_ms_max": max(ms),
            "checkpoint_bytes": saved[-1]["bytes"], "resume_ms": resume_ms, "resumed_at_frame": loaded.frames}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..backends.local import LocalBackend
    from ..bundles.bundle import DEFAULT_MODEL, load_bundle
    from ..engine.threads import default_threads

    torch.set_num_threads(args.threads or default_threads())
    bundle = load_bundle(args.model or DEFAULT_MODEL)
    backend = LocalBackend(bundle, max_streams=max(args.concurrency, 1))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
            costs = _checkpoint_costs(backend, Path(tmp) / "ckpt", args.seconds)
            one_by_one = _run_queue(backend, Path(tmp) / "serial", args.renders, args.seconds, 1, args.checkpoint_every)
            queued = _run_queue(backend, Path(tmp) / "queued", args.renders, args.seconds, args.concurrency,
                                args.checkpoint_every)
    finally:
        backend.shutdown()
    frames = args.renders * round(args.seconds * bundle.fps)
    return {"benchmark": "jobs", "model": bundle.name, "threads": torch.get_num_threads(), "seconds": args.seconds,
            "renders": args.renders, "concurrency": args.concurrency, "checkpoint_every": args.checkpoint_every,
            **costs, "one_by_one_s": one_by_one, "queued_s": queued, "one_by_one_fps": frames / one_by_one,
            "queued_fps": frames / queued}


def render(r: dict[str, Any]) -> str:
    return "\n".join([
        f"bench jobs: {r['model']}, {r['threads']} torch thread(s), {r['renders']} renders of {r['seconds']:g} s",
        f"  checkpoint per chunk     p50 {r['checkpoint_ms_p50']:.1f} ms, max {r['checkpoint_ms_max']:.1f} ms, "
        f"{r['checkpoint_bytes'] / 1024:.0f} KiB ({r['checkpoints']} checkpoints)",
        f"  resume (load + restore)  {r['resume_ms']:.1f} ms at frame {r['resumed_at_frame']}",
        f"  one by one               {r['one_by_one_s']:.1f} s ({r['one_by_one_fps']:.1f} video frames/s)",
        f"  {r['concurrency']} at once, queued       {r['queued_s']:.1f} s ({r['queued_fps']:.1f} video frames/s; "
        f"checkpoint every {r['checkpoint_every']} chunks)"])


def cmd_bench_jobs(args: argparse.Namespace) -> int:
    result = run(args)
    print(render(result))
    print(f"saved {save_result(result, args.out, 'jobs-' + result['model'])}")
    return 0


def add_jobs_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register `bench jobs` on the `bench` command's subparsers."""
    p = bench_subparsers.add_parser("jobs", help="render jobs: checkpoint cost, resume time, queued vs one-by-one throughput")
    p.add_argument("--model", help="built-in model (default: the registry's default)")
    p.add_argument("--seconds", type=float, default=10.0, help="video seconds per render (default %(default)s)")
    p.add_argument("--renders", type=int, default=4, help="renders in the throughput runs (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="jobs at once in the queued run (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=4, help="chunks between checkpoints (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores idle at start)")
    p.add_argument("--out", type=Path, help="JSON file (default bench-results/jobs-MODEL-TIME.json)")
    p.set_defaults(func=cmd_bench_jobs)
    return p
