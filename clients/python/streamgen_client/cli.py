"""`streamgen client URL` (also `python -m streamgen_client`): watch a stream, change prompts on a
schedule, print acks, stalls and timing, optionally record MP4."""
from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from typing import Any

import numpy as np

from .client import ControlError, ServerError, StreamClient


def parse_schedule(text: str) -> list[tuple[float, str]]:
    """"3:a blue square,6:a green circle" → [(3.0, "a blue square"), (6.0, "a green circle")]."""
    items = []
    for part in re.split(r",(?=\s*\d+(?:\.\d+)?\s*:)", text.strip()) if text.strip() else []:
        at, sep, prompt = part.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not sep or seconds < 0 or not prompt.strip():
            raise ValueError(f"schedule item {part!r} is not SECONDS:PROMPT")
        items.append((seconds, prompt.strip()))
    return sorted(items)


def describe_stall(stall: dict[str, Any]) -> str:
    """One line for a `stall` message: where the stream froze, for how long, and why."""
    replaced = f" [replaced {', '.join(stall['replaced'])}]" if stall.get("replaced") else ""
    return f"stall at frame {stall['frame']} ({stall['recovery_s']:.1f} s): {stall['reason']}{replaced}"


async def run(url: str, prompt: str | None, seconds: float, schedule: list[tuple[float, str]], out: str | None,
              token: str | None) -> int:
    async with StreamClient(url, prompt=prompt, token=token, record=out) as client:
        print(f"session {client.session_id}")
        start = time.monotonic()
        times: list[float] = []
        pending = list(schedule)
        stalls_shown = 0
        while (elapsed := time.monotonic() - start) < seconds:
            for stall in client.stalls[stalls_shown:]:
                print(f"{elapsed:6.2f} s  {describe_stall(stall)}")
            stalls_shown = len(client.stalls)
            if pending and elapsed >= pending[0][0]:
                _, text = pending.pop(0)
                sent = time.monotonic()
                try:
                    ack = await client.send_prompt(text)
                    took = 1000 * (time.monotonic() - sent)
                    print(f"{elapsed:6.2f} s  prompt {text!r}: ack at frame {ack['frame']} ({took:.0f} ms)")
                except ControlError as exc:
                    print(f"{elapsed:6.2f} s  prompt {text!r}: error: {exc}")
            try:
                frame = await client.next_frame(timeout=max(0.05, min(1.0, seconds - elapsed)))
                times.append(frame.time)
            except asyncio.TimeoutError:
                pass
        intervals = np.diff(times) * 1000 if len(times) > 1 else np.array([0.0])
        print(f"{len(times)} frames in {seconds:g} s ({len(times) / seconds:.1f} fps); first frame after "
              f"{1000 * (client.first_frame_s or 0):.0f} ms; interval p50 {np.percentile(intervals, 50):.1f} ms, "
              f"p95 {np.percentile(intervals, 95):.1f} ms; server stats {client.stats}")
    if out:
        print(f"saved {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen-client", description=__doc__)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--prompt", help="initial prompt (default: the server's)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to watch")
    parser.add_argument("--schedule", default="", help='prompt changes, e.g. "3:a blue square,6:a green circle"')
    parser.add_argument("-o", "--out", help="record the received video to this MP4 file")
    parser.add_argument("--token", help="bearer token, when the server has one")


def run_args(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args.url, args.prompt, args.seconds, parse_schedule(args.schedule), args.out, args.token))
    except ServerError as exc:
        print(f"streamgen client: server refused: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"streamgen client: cannot stream from {args.url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_args(args)
    except ValueError as exc:
        print(f"streamgen client: error: {exc}", file=sys.stderr)
        return 2
