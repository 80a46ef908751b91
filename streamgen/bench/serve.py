"""`streamgen bench serve`: a live server measured from the viewer's side, with the Python client.

It starts a server in this process (or measures the one at `--url`) and runs each load (default 1
then 4 concurrent sessions) in a separate client process, so that the server's CPU and the clients'
are counted apart and a client's decoding never delays the server's event loop. Per load it reports:
- first frame: `POST /offer` sent → first decoded frame on the client (includes the answer, ICE and
  DTLS, the first chunk's compute and aiortc's one-frame jitter buffer), and the server's own view
  (offer answered → first frame sent);
- inter-frame interval of received frames, p50 / p95 / max, against the nominal 1/fps, and the share
  of sent frames that were new (a model slower than real time re-sends the last frame: the intervals
  stay on time but the picture stalls — `new_frame_share` shows it);
- prompt change → ack round trip (the ack comes when the chunk carrying the change is made) and the
  frames still queued ahead of it (ack frame − frame on screen): together ≈ prompt → visible change;
- CPU per session, % of one core: server process CPU time over the steady window / wall / sessions
  (in-process server only), and the same for the client process.
A warm-up session runs first (its first frame is reported as `cold_first_frame_s`). Goals (one session):
first frame ≤ 1.5 s, p95 interval ≤ 1.5 × nominal.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..backends.names import SCHEDULERS
from .results import save_result

GOAL_FIRST_FRAME_S = 1.5
GOAL_P95_OVER_NOMINAL = 1.5


# --- client process ---------------------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _emit(event: str, **data: Any) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


async def _client_worker(cfg: dict[str, Any]) -> None:
    """Run `sessions` clients against `url`; report on stdout: start/end of the steady window, then results."""
    import streamgen_client as client_mod  # installed with streamgen

    class TimedClient(client_mod.StreamClient):
        """Notes when the offer is posted (the start of 'offer → first frame')."""

        offer_posted: float | None = None

        async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
            if method == "POST" and path == "/offer" and self.offer_posted is None:
                self.offer_posted = time.monotonic()
            return await super()._request(method, path, **kwargs)

    n, seconds, changes = cfg["sessions"], cfg["seconds"], cfg["prompt_changes"]
    clients = [TimedClient(cfg["url"], prompt=f"a benchmark prompt {i}", token=cfg.get("token"), codec=cfg.get("codec"))
               for i in range(n)]
    try:
        async def first(client) -> tuple[float, float]:
            await client.connect()
            frame = await client.next_frame(timeout=30)
            return frame.time - client.offer_posted, client.first_frame_s

        try:
            firsts = await asyncio.gather(*(first(c) for c in clients))
        except client_mod.ServerError as exc:
            hint = (f" (start it with --max-sessions-per-ip {n} and --max-sessions ≥ {n})" if exc.status in (429, 503) else "")
            _emit("error", message=f"the server refused a session: {exc}{hint}")
            return
        for c in clients:
            c.drain()
        before = await asyncio.gather(*(c.session() for c in clients))

        _emit("start")
        cpu0, t0 = time.process_time(), time.monotonic()
        end = t0 + seconds

        async def watch(client) -> list[float]:
            times = []
            while (left := end - time.monotonic()) > 0:
                try:
                    times.append((await client.next_frame(timeout=left)).time)
                except asyncio.TimeoutError:
                    break
            return times

        async def change_prompts(client, index: int) -> list[dict[str, Any]]:
            results = []
            for k in range(changes):
                await asyncio.sleep(max(0.0, t0 + (k + 1) * seconds / (changes + 1) - time.monotonic()))
                sent = time.monotonic()
                try:
                    ack = await client.send_prompt(f"a benchmark prompt {index}.{k}", {"kind": "recache"})
                except (client_mod.ControlError, asyncio.TimeoutError) as exc:
                    results.append({"error": str(exc) or type(exc).__name__})
                    continue
                ack_ms = 1000 * (time.monotonic() - sent)
                shown = (await client.session())["frame"]
                results.append({"ack_ms": ack_ms, "ack_frame": ack["frame"], "frame_on_screen": shown,
                                "frames_ahead": max(0, ack["frame"] - shown), "ack_of": ack["of"]})
            return results

        async def poll_health() -> list[float]:
            """/health round trips through the window (the event loop must never block)."""
            import aiohttp

            times = []
            async with aiohttp.ClientSession() as http:
                while time.monotonic() < end:
                    sent = time.monotonic()
                    async with http.get(f"{cfg['url']}/health") as r:
                        await r.read()
                    times.append(1000 * (time.monotonic() - sent))
                    await asyncio.sleep(0.25)
            return times

        watched = await asyncio.gather(*(watch(c) for c in clients), *(change_prompts(c, i) for i, c in enumerate(clients)),
                                       poll_health())
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        _emit("end")
        after = await asyncio.gather(*(c.session() for c in clients))
        per_session = []
        for i, c in enumerate(clients):
            times, prompts = watched[i], watched[n + i]
            intervals = [1000 * (b - a) for a, b in itertools.pairwise(times)]
            d_sent = after[i]["frames"]["sent"] - before[i]["frames"]["sent"]
            d_held = after[i]["frames"]["held"] - before[i]["frames"]["held"]
            fps = after[i]["fps"]
            acks = [p for p in prompts if "ack_ms" in p]
            per_session.append({
                "session_id": c.session_id, "codec": after[i]["codec"], "fps_nominal": fps,
                "offer_to_first_frame_s": firsts[i][0], "connect_to_first_frame_s": firsts[i][1],
                "server_first_frame_ms": before[i]["first_frame_ms"],
                "frames_received": len(times), "received_fps": len(times) / wall,
                "interval_ms_p50": _pct(intervals, 50), "interval_ms_p95": _pct(intervals, 95),
                "interval_ms_max": max(intervals, default=None), "interval_ms_nominal": 1000 / fps,
                "new_frame_share": d_sent / max(1, d_sent + d_held),
                "frames_dropped_late": after[i]["frames"]["dropped"] - before[i]["frames"]["dropped"],
                "chunk_latency_ms": after[i]["chunk_latency_ms"],
                "server_stats": c.stats,
                "prompt_changes": prompts,
                "prompt_ack_ms": [p["ack_ms"] for p in acks],
                "prompt_visible_ms_est": [p["ack_ms"] + 1000 * p["frames_ahead"] / fps for p in acks],
            })
        _emit("result", wall_s=wall, client_cpu_s=cpu, sessions=per_session, health_ms=watched[-1])
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# --- one load, seen from the server process -------------------------------------------------------
async def _run_load(url: str, sessions: int, seconds: float, prompt_changes: int, token: str | None, codec: str | None,
                    measure_cpu: bool) -> dict[str, Any]:
    cfg = {"url": url, "sessions": sessions, "seconds": seconds, "prompt_changes": prompt_changes, "token": token,
           "codec": codec}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamgen.bench.serve", "_worker", json.dumps(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    cpu: dict[str, float] = {}
    result: dict[str, Any] | None = None
    error: str | None = None
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.ensure_future(proc.stderr.read())
    async for line in proc.stdout:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("event") in ("start", "end"):
            cpu[message["event"]] = time.process_time()
            cpu[message["event"] + "_wall"] = time.monotonic()
        elif message.get("event") == "result":
            result = message
        elif message.get("event") == "error":
            error = message["message"]
    await proc.wait()
    stderr = (await stderr_task).decode(errors="replace")
    if error is not None:
        raise RuntimeError(error)
    if result is None:
        raise RuntimeError(f"the client process failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    wall = result["wall_s"]
    per = result["sessions"]
    server_cpu = None
    if measure_cpu and {"start", "end"} <= cpu.keys():
        server_cpu = 100 * (cpu["end"] - cpu["start"]) / (cpu["end_wall"] - cpu["start_wall"]) / sessions
    pooled_p95 = [s["interval_ms_p95"] for s in per if s["interval_ms_p95"] is not None]
    acks = [ms for s in per for ms in s["prompt_ack_ms"]]
    visible = [ms for s in per for ms in s["prompt_visible_ms_est"]]
    summary = {
        "sessions": sessions,
        "offer_to_first_frame_s_max": max(s["offer_to_first_frame_s"] for s in per),
        "offer_to_first_frame_s_median": statistics.median(s["offer_to_first_frame_s"] for s in per),
        "interval_ms_nominal": per[0]["interval_ms_nominal"],
        "interval_ms_p50_median": statistics.median(s["interval_ms_p50"] for s in per if s["interval_ms_p50"] is not None),
        "interval_ms_p95_worst": max(pooled_p95) if pooled_p95 else None,
        "received_fps_min": min(s["received_fps"] for s in per),
        "new_frame_share_min": min(s["new_frame_share"] for s in per),
        "prompt_ack_ms_p50": _pct(acks, 50), "prompt_ack_ms_p95": _pct(acks, 95),
        "prompt_visible_ms_est_p50": _pct(visible, 50),
        "prompt_errors": sum(1 for s in per for p in s["prompt_changes"] if "error" in p),
        # an ack answers its own message: the client matches replies by id, so a wrong one shows as another kind
        "acks_of_another_message": sum(1 for s in per for p in s["prompt_changes"] if p.get("ack_of", "prompt") != "prompt"),
        "health_ms_p50": _pct(result["health_ms"], 50), "health_ms_max": max(result["health_ms"], default=None),
        "server_cpu_pct_per_session": server_cpu,
        "client_cpu_pct_per_session": 100 * result["client_cpu_s"] / wall / sessions,
    }
    return {"summary": summary, "per_session": per, "window_s": wall}


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.url is not None or len(args.scheduler) == 1:
        return await _bench_one(args, args.scheduler[0])
    runs = {}
    for scheduler in args.scheduler:  # the same loads against each, one after the other, in this one run
        say(args, f"scheduler {scheduler}")
        runs[scheduler] = await _bench_one(args, scheduler)
    return {"benchmark": "serve", "compare": "scheduler", "runs": runs}


async def _bench_one(args: argparse.Namespace, scheduler: str) -> dict[str, Any]:
    import torch

    from ..serve.config import ServeConfig

    loads = sorted(set(args.sessions))
    server = None
    url = args.url
    if url is None:
        from ..serve.server import Server

        most = max(loads)
        server = Server(ServeConfig(port=0, model=args.model or ServeConfig.model, max_sessions=max(most, args.max_sessions or 0),
                                    max_sessions_per_ip=max(most, args.max_sessions or 0), threads=args.threads,
                                    codec=args.codec or "vp8", scheduler=scheduler,
                                    offer_rate=1000.0))  # every simulated viewer shares one address
        await server.start()
        url = server.url
    try:
        result: dict[str, Any] = {
            "benchmark": "serve",
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "server": ({"url": None, "model": server.config.model, "max_sessions": server.config.max_sessions,
                        "torch_threads": torch.get_num_threads(), "codec": server.config.codec,
                        "scheduler": server.config.scheduler,
                        "display_size": server.config.display_size, "in_process": True}
                       if server else {"url": url, "in_process": False}),
            "seconds": args.seconds, "prompt_changes": args.prompt_changes, "loads": {},
        }
        if args.warmup:
            say(args, "warm-up session …")
            warm = await _run_load(url, 1, 1.0, 0, args.token, args.codec, False)
            result["cold_first_frame_s"] = warm["summary"]["offer_to_first_frame_s_max"]
        for n in loads:
            say(args, f"{n} session{'s' if n > 1 else ''}, {args.seconds:g} s …")
            result["loads"][str(n)] = await _run_load(url, n, args.seconds, args.prompt_changes, args.token, args.codec,
                                                      server is not None)
        one = result["loads"].get("1", {}).get("summary")
        if one is not None:
            result["goals"] = {
                "first_frame_s": {"value": one["offer_to_first_frame_s_max"], "goal": GOAL_FIRST_FRAME_S,
                                  "met": one["offer_to_first_frame_s_max"] <= GOAL_FIRST_FRAME_S},
                "p95_interval_over_nominal": {
                    "value": one["interval_ms_p95_worst"] / one["interval_ms_nominal"], "goal": GOAL_P95_OVER_NOMINAL,
                    "met": one["interval_ms_p95_worst"] / one["interval_ms_nominal"] <= GOAL_P95_OVER_NOMINAL},
            }
        return result
    finally:
        if server is not None:
            await server.stop()


def say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"bench serve: {text}", file=sys.stderr, flush=True)


def render(result: dict[str, Any]) -> str:
    if "runs" in result:
        return "\n".join(render(run) for run in result["runs"].values())
    srv = result["server"]
    where = (f"in-process server, model {srv['model']}, scheduler {srv['scheduler']}, torch threads {srv['torch_threads']}, "
             f"{srv['codec']}, "
             f"{srv['display_size']} px" if srv["in_process"] else f"server {srv['url']}")
    lines = [f"bench serve: {where}; {result['machine']['cpus']} CPUs; {result['seconds']:g} s per load"]
    if "cold_first_frame_s" in result:
        lines.append(f"  cold first frame (warm-up session)    {1000 * result['cold_first_frame_s']:.0f} ms")

    def fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
        return "–" if value is None else f"{value * scale:.{digits}f}{unit}"

    rows = [("offer → first frame, max", "offer_to_first_frame_s_max", " ms", 1000, 0),
            ("inter-frame p50 (median session)", "interval_ms_p50_median", " ms", 1, 1),
            ("inter-frame p95 (worst session)", "interval_ms_p95_worst", " ms", 1, 1),
            ("nominal interval", "interval_ms_nominal", " ms", 1, 1),
            ("received fps, min", "received_fps_min", "", 1, 2),
            ("new frames / sent, min", "new_frame_share_min", " %", 100, 1),
            ("prompt → ack p50", "prompt_ack_ms_p50", " ms", 1, 0),
            ("prompt → ack p95", "prompt_ack_ms_p95", " ms", 1, 0),
            ("prompt → visible p50 (est.)", "prompt_visible_ms_est_p50", " ms", 1, 0),
            ("server CPU per session", "server_cpu_pct_per_session", " % core", 1, 1),
            ("acks of another message", "acks_of_another_message", "", 1, 0),
            ("/health p50", "health_ms_p50", " ms", 1, 1),
            ("/health max", "health_ms_max", " ms", 1, 1),
            ("client CPU per session", "client_cpu_pct_per_session", " % core", 1, 1)]
    loads = result["loads"]
    lines.append(f"  {'':<38}" + "".join(f"{n + ' session' + ('s' if n != '1' else ''):>16}" for n in loads))
    for label, key, unit, scale, digits in rows:
        lines.append(f"  {label:<38}" + "".join(f"{fmt(loads[n]['summary'][key], unit, scale, digits):>16}" for n in loads))
    for name, goal in result.get("goals", {}).items():
        value = f"{goal['value']:.3g}"
        lines.append(f"  goal {name}: {value} (≤ {goal['goal']:g}) {'met' if goal['met'] else 'NOT MET'}")
    return "\n".join(lines)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("aioice").setLevel(logging.WARNING)
    if args.offer_flood:
        from . import offer_flood

        result = asyncio.run(offer_flood.run(args))
        print(offer_flood.render(result))
        print(f"saved {save_result(result, args.out, 'serve-offer-flood')}")
        return 0
    try:
        result = asyncio.run(_bench(args))
    except RuntimeError as exc:
        print(f"streamgen bench serve: {exc}", file=sys.stderr)
        return 1
    print(render(result))
    first = next(iter(result["runs"].values())) if "runs" in result else result
    print(f"saved {save_result(result, args.out, 'serve-' + (first['server'].get('model') or 'url'))}")
    return 0


def add_serve_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register `bench serve` on the `bench` command's subparsers."""
    p = bench_subparsers.add_parser("serve", help="a live server seen by Python clients: first frame, inter-frame "
                                                  "p50/p95, prompt → ack, CPU per session (1 and 4 sessions)")
    p.add_argument("--url", help="measure this running server (default: start one in this process)")
    p.add_argument("--model", help="bundle for the in-process server (default: the registry's default)")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4], help="concurrent sessions per load (default 1 4)")
    p.add_argument("--seconds", type=float, default=8.0, help="steady window per load")
    p.add_argument("--prompt-changes", type=int, default=4, help="prompt changes per session in the window")
    p.add_argument("--max-sessions", type=int, help="in-process server capacity (default: the largest load); "
                                                    "sets torch threads = cores / this")
    p.add_argument("--threads", type=int, help="torch threads of the in-process server (default: the server's)")
    p.add_argument("--scheduler", nargs="+", choices=SCHEDULERS, default=["engine"],
                   help="the in-process server's local scheduler; several: each measured in this run, one after the other "
                        "(engine = one batched loop for all sessions; threads = a generation thread per session)")
    p.add_argument("--codec", choices=["vp8", "h264"], help="codec to ask for (default: the server's, VP8)")
    p.add_argument("--token", help="bearer token of the server at --url")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the discarded warm-up session")
    p.add_argument("--offer-flood", action="store_true",
                   help="instead: a healthy viewer's new-frame rate before and during a flood of session create/delete "
                        "cycles from one address, with the per-address offer limit and without it (--seconds per window)")
    p.add_argument("--offer-rate", type=float, default=2.0, help="with --offer-flood: the limit measured (default 2/s)")
    p.add_argument("--out", type=Path, help="JSON file (default bench-results/serve-MODEL-TIME.json)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench_serve)
    return p


def main(argv: list[str] | None = None) -> int:  # python -m streamgen.bench.serve (until the CLI wires it)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:  # the client process of one load
        asyncio.run(_client_worker(json.loads(argv[1])))
        return 0
    parser = argparse.ArgumentParser(prog="streamgen bench")
    add_serve_bench_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["serve", *argv])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
