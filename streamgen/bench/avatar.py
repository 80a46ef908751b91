"""`streamgen bench avatar`: avatar sessions measured end to end — speech in over WebRTC, the talking face and
its audio back.

Per load (default 1, then 4 sessions): an in-process `streamgen serve --model embedded-avatar`, and one
Python-client process per session (`python -m streamgen_client URL --audio SPEECH --reference FACE -o …`: its
microphone track is the speech file, paced in real time; it records the video and audio it gets back).
- audio in → frame out: for every frame sent that carried real audio, the server's time from that audio's last
  sample arriving to the frame leaving (`SessionAvatar.latency_log`), p50 / p95 over the steady window;
- A/V offset at the viewer: the lag (frames of 62.5 ms) maximising the correlation of the mouth opening read
  off the received video with the loudness of the received audio (0 = in sync), from each client's recording;
- CPU per session, % of one core: the server process's CPU time over the steady window / wall / sessions
  (the clients run in their own processes and are not counted).
The speech is espeak-ng's (phrases and silences alternating), or the avatar world's `babble` without it.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .results import save_result

PHRASES = ("streaming avatars talk in real time", "the quick brown fox jumps over the lazy dog",
           "one two three four five six seven")
WARM_UP_S = 3.0


def speech_wav(path: Path, seconds: float) -> str:
    """A 16 kHz mono WAV of `seconds`: espeak-ng phrases with 0.8 s pauses (or `babble`); returns its source."""
    import numpy as np

    from ..audio import SAMPLE_RATE, load_audio, write_wav
    from ..avatar_world import babble

    parts, source = [], "babble"
    if shutil.which("espeak-ng"):
        source = "espeak-ng"
        for i, text in enumerate(PHRASES):
            raw = path.with_name(f"phrase{i}.wav")
            subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, timeout=60)
            parts += [load_audio(raw).numpy(), np.zeros(int(0.8 * SAMPLE_RATE), np.float32)]
    one = np.concatenate(parts) if parts else babble(0, 10.0)
    write_wav(path, np.resize(one, int(seconds * SAMPLE_RATE)), SAMPLE_RATE)
    return source


def face_png(path: Path) -> None:
    """One orange disc on black: a round orange face."""
    import numpy as np

    from ..images import encode_png

    yy, xx = np.mgrid[:128, :128]
    img = np.zeros((128, 128, 3), np.uint8)
    img[(yy - 64) ** 2 + (xx - 64) ** 2 <= 48 ** 2] = (240, 140, 30)
    path.write_bytes(encode_png(img))


def av_offset_frames(recording: Path, fps: float) -> int | None:
    """The A/V lag of a client's recording (positive: the mouth trails the audio), or None if it has no audio."""
    import av
    import numpy as np

    from ..audio import SAMPLE_RATE, resample
    from ..avatar_world import lag_and_correlation, opening_for_db, read_frames

    with av.open(str(recording)) as c:
        if not c.streams.audio:
            return None
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    with av.open(str(recording)) as c:
        rate = c.streams.audio[0].rate
        chunks = [(f.time, f.to_ndarray().mean(axis=0)) for f in c.decode(audio=0)]
    if len(frames) < 32 or not chunks:
        return None
    start = chunks[0][0]
    audio = np.concatenate([a for _, a in chunks]).astype(np.float32)
    audio = resample(audio, rate, SAMPLE_RATE).numpy()
    side = frames[0][1].shape[0] // 32
    small = np.stack([image[side // 2::side, side // 2::side][:32, :32] for _, image in frames])
    opening = np.array([r.opening for r in read_frames(small)])
    per_frame = SAMPLE_RATE / fps
    levels = []
    for t, _ in frames:
        a = int((t - start) * SAMPLE_RATE)
        window = audio[max(0, a):max(0, a) + int(per_frame)]
        levels.append(10 * np.log10(np.mean(window.astype(np.float64) ** 2) + 1e-12) if len(window) else -120.0)
    lag, _, _ = lag_and_correlation(opening, opening_for_db(np.array(levels)).astype(float))
    return lag


async def _load(sessions: int, seconds: float, wav: Path, png: Path, folder: Path, threads: int | None) -> dict[str, Any]:
    from ..serve.config import ServeConfig
    from ..serve.server import Server

    async with Server(ServeConfig(port=0, model="embedded-avatar", max_sessions=sessions, threads=threads,
                                  max_sessions_per_ip=sessions, offer_rate=100.0)) as server:
        clients = [subprocess.Popen([sys.executable, "-m", "streamgen_client", server.url, "--audio", str(wav),
                                     "--reference", str(png), "--seconds", f"{seconds:g}", "-o",
                                     str(folder / f"client{i}.mp4")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE) for i in range(sessions)]
        await asyncio.sleep(WARM_UP_S)
        cpu0, wall0 = time.process_time(), time.monotonic()
        marks = {s.id: len(s.avatar.latency_log) for s in server.manager.sessions.values() if s.avatar is not None}
        await asyncio.sleep(max(1.0, seconds - WARM_UP_S - 1.0))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        latencies = [x for s in server.manager.sessions.values() if s.avatar is not None
                     for x in list(s.avatar.latency_log)[marks.get(s.id, 0):]]
        fps = server.backend.bundle.fps
        for c in clients:
            await asyncio.to_thread(c.wait, seconds + 60)
    failed = [c.stderr.read().decode()[-300:] for c in clients if c.returncode != 0]
    offsets = [av_offset_frames(folder / f"client{i}.mp4", fps) for i in range(sessions)]
    ms = sorted(1000 * x for x in latencies)
    return {"sessions": sessions, "frames_measured": len(ms), "failed_clients": failed,
            "av_latency_ms_p50": statistics.median(ms) if ms else None,
            "av_latency_ms_p95": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))] if ms else None,
            "av_offset_frames": offsets, "av_offset_ms": [None if o is None else 1000 * o / fps for o in offsets],
            "cpu_per_session_pct": 100 * cpu / wall / sessions}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-avatar-") as tmp:
        folder = Path(tmp)
        source = speech_wav(folder / "speech.wav", args.seconds + 5)
        face_png(folder / "face.png")
        loads = [asyncio.run(_load(n, args.seconds, folder / "speech.wav", folder / "face.png", folder, args.threads))
                 for n in args.sessions]
    return {"benchmark": "avatar", "model": "embedded-avatar", "speech": source, "seconds": args.seconds, "loads": loads}


def render(r: dict[str, Any]) -> str:
    lines = [f"bench avatar: embedded-avatar, {r['seconds']:g} s per load, speech from {r['speech']}"]
    for load in r["loads"]:
        p50, p95 = load["av_latency_ms_p50"], load["av_latency_ms_p95"]
        lines.append(f"  {load['sessions']} session(s): audio in → frame out p50 {p50 or float('nan'):.0f} ms, "
                     f"p95 {p95 or float('nan'):.0f} ms ({load['frames_measured']} frames); A/V offset at the viewer "
                     f"{load['av_offset_frames']} frames; CPU {load['cpu_per_session_pct']:.0f} % of a core per session"
                     + (f"; {len(load['failed_clients'])} client(s) failed" if load["failed_clients"] else ""))
    return "\n".join(lines)


def cmd_bench_avatar(args: argparse.Namespace) -> int:
    result = run(args)
    print(render(result))
    print(f"saved {save_result(result, args.out, 'avatar')}")
    return 0


def add_avatar_bench_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register `bench avatar` on the `bench` command's subparsers."""
    p = bench_subparsers.add_parser("avatar", help="avatar sessions: audio-in → frame-out latency, A/V offset, CPU")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4], help="loads to measure (default: 1 4)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per load (default %(default)s)")
    p.add_argument("--threads", type=int, help="the server's torch threads (default: the cores idle at start)")
    p.add_argument("--out", type=Path, help="JSON file (default bench-results/avatar-TIME.json)")
    p.set_defaults(func=cmd_bench_avatar)
    return p
