"""`streamgen client URL` (also `python -m streamgen_client`): watch a stream, change prompts at set
times (--prompts-at), print acks, stalls and timing, optionally record MP4. For an avatar model, --audio
sends a speech file as the session's audio (in real time, as a microphone would) and --reference a face
picture; the MP4 then holds the audio that comes back beside the video."""
from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import time
from typing import Any
from urllib.parse import urlsplit

# Only argparse-level imports here: `streamgen`'s parser adds these arguments without importing aiortc.

DEFAULT_SECONDS = 10.0
AUDIO_TAIL_S = 2.0  # with --audio, watched past the speech's end: its last frames are still being made and sent


def parse_prompts_at(text: str) -> list[tuple[float, str]]:
    """"3:a blue square,6:a green circle" → [(3.0, "a blue square"), (6.0, "a green circle")]."""
    items = []
    for part in re.split(r",(?=\s*\d+(?:\.\d+)?\s*:)", text.strip()) if text.strip() else []:
        at, sep, prompt = part.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if not sep or not 0 <= seconds < math.inf or not prompt.strip():
            raise ValueError(f"--prompts-at item {part!r} is not SECONDS:PROMPT")
        items.append((seconds, prompt.strip()))
    return sorted(items)


def _prompts_at_arg(text: str) -> list[tuple[float, str]]:
    try:
        return parse_prompts_at(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds_arg(text: str) -> float:
    """How long to watch: a finite number > 0 (0 would divide by zero, a negative one watch nothing)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return seconds


def _url_arg(text: str) -> str:
    """The server's base URL; anything else would fail later as an odd path ("notaurl/ice-servers")."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text} is not an http(s) URL, e.g. http://127.0.0.1:8080")
    return text


def describe_stall(stall: dict[str, Any]) -> str:
    """One line for a `stall` message: where the stream froze, for how long, and why."""
    replaced = f" [replaced {', '.join(stall['replaced'])}]" if stall.get("replaced") else ""
    return f"stall at frame {stall['frame']} ({stall['recovery_s']:.1f} s): {stall['reason']}{replaced}"


def watch_seconds(seconds: float | None, audio_s: float | None) -> float:
    """--seconds, else the speech's length and a tail (--audio), else DEFAULT_SECONDS."""
    if seconds is not None:
        return seconds
    return DEFAULT_SECONDS if audio_s is None else audio_s + AUDIO_TAIL_S


async def run(url: str, prompt: str | None, seconds: float | None, prompts_at: list[tuple[float, str]],
              out: str | None, token: str | None, audio: str | None = None, reference: str | None = None) -> int:
    import numpy as np

    from .client import ControlError, StreamClient
    from .recorder import AUDIO_RATE

    async with StreamClient(url, prompt=prompt, token=token, record=out, audio=audio, reference=reference) as client:
        print(f"session {client.session_id}")
        seconds = watch_seconds(seconds, client.audio_track.duration_s if client.audio_track is not None else None)
        if prompt and (warning := ((await client.session()).get("prompt_detail") or {}).get("warning")):
            print(f"warning: {warning}", file=sys.stderr)
        start = time.monotonic()
        times: list[float] = []
        pending = list(prompts_at)
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
                    if warning := (ack.get("detail") or {}).get("warning"):
                        print(f"warning: {warning}", file=sys.stderr)
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
        if client.audio_track is not None:
            print(f"audio: {client.audio_track.duration_s:.1f} s of speech sent, "
                  f"{client.audio_received / AUDIO_RATE:.1f} s of audio received")
    if out:
        print(f"saved {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen-client", description=__doc__)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's arguments, for its own parser and for `streamgen client` (one definition)."""
    parser.add_argument("url", type=_url_arg, help="server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--prompt", help="initial prompt (default: the server's)")
    parser.add_argument("--seconds", type=_seconds_arg, default=None,
                        help=f"how long to watch (default: {DEFAULT_SECONDS:g}; with --audio the speech's length + "
                             f"{AUDIO_TAIL_S:g})")
    parser.add_argument("--prompts-at", type=_prompts_at_arg, default=[], metavar="S:PROMPT,…",
                        help='prompt changes at seconds into the stream, e.g. "3:a blue square,6:a green circle"')
    parser.add_argument("--audio", metavar="SPEECH.wav",
                        help="an avatar model's drive: this speech file is sent as the session's audio, in real time")
    parser.add_argument("--reference", metavar="FACE.png", help="an avatar model's face: a PNG or JPEG picture")
    parser.add_argument("-o", "--out", help="record the received video (and an avatar's audio) to this MP4 file")
    parser.add_argument("--token", help="bearer token, when the server has one")


def run_args(args: argparse.Namespace) -> int:
    import aiohttp

    from .client import ServerError
    from .media import MediaFileError

    try:
        return asyncio.run(run(args.url, args.prompt, args.seconds, args.prompts_at, args.out, args.token,
                               args.audio, args.reference))
    except MediaFileError as exc:  # before connecting: nothing was sent
        print(f"streamgen client: error: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"streamgen client: server refused: {exc}", file=sys.stderr)
        return 1
    except aiohttp.ClientConnectionError as exc:  # refused, unknown host, dropped: one line, no traceback
        reason = getattr(exc, "os_error", None) or exc
        print(f"streamgen client: cannot reach the server at {args.url}: {reason}", file=sys.stderr)
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
