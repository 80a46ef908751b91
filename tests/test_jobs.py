"""Render jobs as a service: the SQLite store, the spec checks, checkpoint + bit-exact resume, the
scheduler, the `/jobs` API on a real server, `streamgen jobs`, and a kill -9 of `streamgen serve`.

Every wait has a hang guard; assertions are on states, counts and bytes, never on durations. Resumed
latents are compared with those of an uninterrupted `run_job` / `streamgen render` of the same spec.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import av
import pytest
import torch

from streamgen.backends.local import LocalBackend
from streamgen.bundles.bundle import load_bundle
from streamgen.jobs import runner
from streamgen.jobs.cli import add_jobs_parser
from streamgen.jobs.scheduler import JobScheduler, QueueFull, SchedulerConfig
from streamgen.jobs.spec import SpecError, parse_spec
from streamgen.jobs.store import Conflict, JobStore
from streamgen.render.job import run_job
from streamgen.render.writer import load_latents
from streamgen.serve.config import ServeConfig
from streamgen.serve.server import Server

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 120.0
TIMELINE = [{"at": 0, "prompt": "a calm lake"}, {"at": 1.0, "prompt": "a red fox", "transition": "blend"}]


def wait_for(check, what: str, seconds: float = HANG_S, step: float = 0.02):
    """Poll `check()` until truthy (its value); fail naming `what` past the hang guard."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if value := check():
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def cli_main(argv: list[str]) -> int:
    """`streamgen …` with only the `jobs` subcommand (what streamgen.cli registers)."""
    parser = argparse.ArgumentParser(prog="streamgen")
    add_jobs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.fixture(scope="module")
def backends(one_thread):
    """A local backend per built-in model, made when first asked for."""
    made: dict[str, LocalBackend] = {}

    def get(model: str = "tiny-random") -> LocalBackend:
        if model not in made:
            made[model] = LocalBackend(load_bundle(model))
        return made[model]
    yield get
    for b in made.values():
        b.shutdown()


@pytest.fixture(scope="module")
def backend(backends) -> LocalBackend:
    return backends()


def reference_latents(spec, backend, tmp: Path) -> torch.Tensor:
    """What `streamgen render` computes for this spec (the same `run_job`)."""
    job = runner.render_job(spec, backend.bundle)
    job.latents_out = tmp / "reference.safetensors"
    run_job(job, backend)
    return load_latents(job.latents_out)[0]


# --- store and spec --------------------------------------------------------------------------------
def test_store_idempotent_ids_states_priorities_and_events(tmp_path) -> None:
    store = JobStore(tmp_path)
    _, spec = parse_spec({"prompt": "a red fox", "seconds": 1})
    a, created = store.submit(spec, 16, "a")
    again, created_again = store.submit(spec, 16, "a")
    assert created and not created_again and again.id == a.id and again.created_at == a.created_at
    with pytest.raises(Conflict, match="another spec"):
        store.submit(parse_spec({"prompt": "a red fox", "seconds": 2})[1], 32, "a")
    store.submit(parse_spec({"prompt": "x", "seconds": 1, "priority": 5})[1], 16, "high")
    store.submit(parse_spec({"prompt": "y", "seconds": 1, "priority": 5})[1], 16, "high-later")
    assert store.next_queued().id == "high"  # higher first, FIFO within one priority
    store.set_state("high", "running")
    assert store.next_queued().id == "high-later"
    store.set_state("high", "succeeded")
    with pytest.raises(Conflict, match="succeeded: it cannot become running"):
        store.set_state("high", "running")
    assert store.request_cancel("a").state == "cancelled"
    assert [j.id for j in store.list("queued")] == ["high-later"] and store.count("succeeded") == 1
    events = store.events("high")
    assert [e.data["state"] for e in events] == ["queued", "running", "succeeded"]
    assert [e.id for e in store.events("high", after=events[0].id)] == [e.id for e in events[1:]]
    with pytest.raises(ValueError, match="in use by another process"):
        JobStore(tmp_path)  # one server per jobs dir
    store.close()
    reopened = JobStore(tmp_path)  # the rows are on disk (WAL), not in this process
    assert reopened.get("high").state == "succeeded" and reopened.get("a").state == "cancelled"


@pytest.mark.parametrize("body, field", [
    ({"seconds": 1}, "prompt"),
    ({"prompt": "x"}, "seconds"),
    ({"prompt": "x", "seconds": -1}, "seconds"),
    ({"prompt": "x", "seconds": 1, "colour": "red"}, "colour"),
    ({"timeline": [{"at": 0, "prompt": "a"}, {"at": 0, "prompt": "b"}], "seconds": 1}, "timeline"),
    ({"timeline": [{"at": 1, "prompt": "a"}], "seconds": 1}, "timeline"),
    ({"prompt": "x", "seconds": 1, "schedule": "fast"}, "schedule"),
    ({"prompt": "x", "seconds": 1, "size": "33x32"}, "size"),
    ({"prompt": "x", "seconds": 1, "id": "../etc"}, "id"),
    ({"prompt": "x", "seconds": 1, "seed": 1.5}, "seed"),
])
def test_bad_specs_name_their_field(body, field) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(body)
    assert err.value.field == field, err.value


def test_model_level_checks_name_their_field(backend) -> None:
    for body, field in (({"prompt": "x", "seconds": 1, "model": "embedded"}, "model"),
                        ({"prompt": "x", "seconds": 1, "policy": "lru"}, "policy")):
        with pytest.raises(SpecError) as err:
            runner.render_job(parse_spec(body)[1], backend.bundle)
        assert err.value.field == field, err.value


# --- checkpoint and resume -------------------------------------------------------------------------
class Crash(BaseException):
    """A simulated process death: not an Exception, so the runner's error handling does not see it."""


class CrashingBackend:
    """The test backend, whose streams die at chunk `at` (the job row stays `running`, files as they are)."""

    def __init__(self, backend: LocalBackend, at: int) -> None:
        self.backend, self.at, self.bundle = backend, at, backend.bundle

    def open(self, prompt, overrides):
        fs = self.backend.open(prompt, overrides)
        real, count = fs.next, [0]

        def next_or_die():
            count[0] += 1
            if count[0] == self.at:
                raise Crash
            return real()
        fs.next = next_or_die
        return fs

    def close(self, fs) -> None:
        self.backend.close(fs)


@pytest.mark.parametrize("model, schedule", [("tiny-random", None), ("tiny-random", "timestep-slot"), ("embedded", None)])
def test_a_crashed_job_resumes_bit_exact_from_its_checkpoint(tmp_path, backends, model, schedule) -> None:
    """tiny-random: ema_sink, exact or timestep-slot (a cache per step); embedded: window_sink with its sink."""
    backend = backends(model)
    frames = round(6 * backend.bundle.fps)
    store = JobStore(tmp_path / "jobs")
    prompts = TIMELINE if model == "tiny-random" else [{"at": 0, "prompt": "a red circle moving left"},
                                                       {"at": 2.0, "prompt": "a blue square moving up"}]
    body = {"id": "story", "timeline": prompts, "seconds": frames / backend.bundle.fps, "seed": 5}
    job_id, spec = parse_spec({**body, **({"schedule": schedule} if schedule else {})})
    job = store.set_state(store.submit(spec, frames, job_id)[0].id, "running")
    with pytest.raises(Crash):  # at chunk 8: after the checkpoint at chunk 6 and chunk 7 written (work to lose)
        runner.run(job, store, CrashingBackend(backend, 8), threading.Event(), threading.Event(), checkpoint_every=3)
    folder = store.job_dir("story")
    assert {p.name for p in folder.glob("seg_*.mp4")} == {"seg_000000.mp4", "seg_000009.mp4"}
    # a crash between committing a segment and the checkpoint listing it leaves a segment no checkpoint covers
    (folder / "seg_000018.mp4").write_bytes(b"not covered by the checkpoint")
    (folder / ".seg_000021.mp4.1-ab.partial").write_bytes(b"half a segment")
    store.close()

    store = JobStore(tmp_path / "jobs")  # a fresh process's store and scheduler on the same dir
    scheduler = JobScheduler(store, backend, SchedulerConfig(checkpoint_every=3))
    scheduler.start()
    try:
        wait_for(lambda: store.get("story").state in ("succeeded", "failed"), "the resumed job")
    finally:
        scheduler.stop()
    done = store.get("story")
    assert done.state == "succeeded", done.error
    resumed = [e.data for e in store.events("story") if e.kind == "resumed"]
    assert resumed == [{"frames_done": 18, "chunks": 6}]
    kinds = [e.kind for e in store.events("story")]
    if schedule is None:  # exact: chunk 6 takes its inputs after the checkpoint (timestep-slot: before, in flight)
        assert "prompt" in kinds[kinds.index("resumed"):]  # the switch queued before chunk 0 survived the checkpoint
    latents = load_latents(folder / "latents.safetensors")[0]
    assert torch.equal(latents, reference_latents(spec, backend, tmp_path))
    assert decoded_frames(folder / "output.mp4") == frames
    assert sorted(p.name for p in folder.iterdir()) == ["latents.safetensors", "output.mp4"]  # no segment, no checkpoint
    checkpoints = [e.data for e in store.events("story") if e.kind == "checkpoint"]
    assert checkpoints and all(c["bytes"] > 0 for c in checkpoints)


def test_scheduler_priorities_cancel_and_queue_limit(tmp_path, backend) -> None:
    store = JobStore(tmp_path)
    scheduler = JobScheduler(store, backend, SchedulerConfig(concurrency=1, max_queued=3, checkpoint_every=2))
    for job_id, priority in (("low", 0), ("high", 9), ("mid", 4)):
        scheduler.submit(parse_spec({"prompt": "a red fox", "seconds": 0.5, "priority": priority})[1], job_id)
    with pytest.raises(QueueFull) as full:
        scheduler.submit(parse_spec({"prompt": "more", "seconds": 0.5})[1], "more")
    assert full.value.limit == 3
    assert scheduler.submit(parse_spec({"prompt": "a red fox", "seconds": 0.5, "priority": 4})[1], "mid")[1] is False
    scheduler.start()
    try:
        wait_for(lambda: all(store.get(j).state == "succeeded" for j in ("low", "high", "mid")), "three jobs")
        order = sorted(("low", "high", "mid"), key=lambda j: store.get(j).started_at)
        assert order == ["high", "mid", "low"]
        long_spec = parse_spec({"prompt": "a long one", "seconds": 600})[1]
        scheduler.submit(long_spec, "long")
        wait_for(lambda: store.get("long").frames_done > 0, "the long job to start")
        assert scheduler.cancel("long").cancel_requested
        wait_for(lambda: store.get("long").state == "cancelled", "the cancel")
        assert not store.job_dir("long").exists()  # nothing half-written is left
        with pytest.raises(Conflict, match="already cancelled"):
            scheduler.cancel("long")
    finally:
        scheduler.stop()


# --- the API on a real server, and `streamgen jobs` -------------------------------------------------
async def _sse(http: aiohttp.ClientSession, url: str, after: int | None = None) -> list[tuple[int, str, dict]]:
    """Every event of a job's stream until the server ends it."""
    headers = {"Authorization": "Bearer t0k", **({"Last-Event-ID": str(after)} if after is not None else {})}
    events, block = [], {}
    async with http.get(url, headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if not line:
                events.append((int(block["id"]), block["event"], json.loads(block["data"])))
                block = {}
            else:
                key, _, value = line.partition(": ")
                block[key] = value
    return events


def test_jobs_api_and_cli(tmp_path, one_thread) -> None:
    auth = {"Authorization": "Bearer t0k"}

    async def main() -> None:
        config = ServeConfig(port=0, model="tiny-random", token="t0k", threads=1, jobs_dir=tmp_path, jobs_max_queued=1)
        async with Server(config) as server, aiohttp.ClientSession() as http:
            url = server.url
            body = {"id": "api-1", "timeline": TIMELINE, "seconds": 2, "seed": 1}
            async with http.post(f"{url}/jobs", json=body) as r:
                assert r.status == 401  # the server's token guards /jobs too
            async with http.post(f"{url}/jobs", json=body, headers=auth) as r:
                created = await r.json()
                assert r.status == 202 and created["id"] == "api-1" and created["links"]["output"] == "/jobs/api-1/output"
            async with http.post(f"{url}/jobs", json=body, headers=auth) as r:
                assert r.status == 200 and (await r.json())["id"] == "api-1"
            async with http.post(f"{url}/jobs", json={**body, "seed": 2}, headers=auth) as r:
                assert r.status == 409
            async with http.post(f"{url}/jobs", json={"prompt": "x", "seconds": "long"}, headers=auth) as r:
                assert r.status == 422 and (await r.json())["field"] == "seconds"
            events = await _sse(http, f"{url}/jobs/api-1/events")
            states = [d["state"] for _, kind, d in events if kind == "state"]
            assert states == ["queued", "running", "succeeded"]
            assert [i for i, _, _ in events] == sorted(i for i, _, _ in events)
            progress = [d for _, kind, d in events if kind == "progress"]
            assert progress[-1]["frames_done"] == progress[-1]["frames_total"] == 32
            replay = await _sse(http, f"{url}/jobs/api-1/events", after=events[1][0])
            assert replay == events[2:]
            assert await _sse(http, f"{url}/jobs/api-1/events", after=events[-1][0]) == []  # ends: nothing more comes
            async with http.get(f"{url}/jobs/api-1", headers=auth) as r:
                job = await r.json()
                assert job["state"] == "succeeded" and job["frames_done"] == 32 and job["progress"] == 1.0
            async with http.get(f"{url}/jobs/api-1/output", headers=auth) as r:
                video = await r.read()
                assert r.status == 200 and r.headers["Content-Type"] == "video/mp4"
            async with http.get(f"{url}/jobs/api-1/output", headers={**auth, "Range": "bytes=0-99"}) as r:
                assert r.status == 206 and await r.read() == video[:100]
            (tmp_path / "api.mp4").write_bytes(video)
            assert decoded_frames(tmp_path / "api.mp4") == 32

            # one running (long), one queued: the queue is full (limit 1)
            for job_id in ("long-1", "long-2"):
                async with http.post(f"{url}/jobs", json={"id": job_id, "prompt": "x", "seconds": 600}, headers=auth) as r:
                    assert r.status == 202
                while job_id == "long-1":  # a worker takes it off the queue before the second is queued
                    async with http.get(f"{url}/jobs/long-1", headers=auth) as r:
                        if (await r.json())["state"] == "running":
                            break
                    await asyncio.sleep(0.02)
            async with http.post(f"{url}/jobs", json={"prompt": "x", "seconds": 1}, headers=auth) as r:
                assert r.status == 429 and (await r.json())["limit"] == 1
            async with http.get(f"{url}/jobs?state=queued", headers=auth) as r:
                assert [j["id"] for j in (await r.json())["jobs"]] == ["long-2"]
            async with http.get(f"{url}/jobs?state=nope", headers=auth) as r:
                assert r.status == 422
            async with http.get(f"{url}/jobs/long-2/output", headers=auth) as r:
                assert r.status == 409
            async with http.delete(f"{url}/jobs/long-2", headers=auth) as r:
                assert r.status == 202 and (await r.json())["state"] == "cancelled"

            # the CLI (synchronous urllib) in a thread, against this server
            os.environ["STREAMGEN_TOKEN"] = "t0k"
            try:
                assert await asyncio.to_thread(cli_main, ["jobs", "cancel", "long-1", "--server", url]) == 0
                assert await asyncio.to_thread(cli_main, ["jobs", "watch", "long-1", "--server", url, "--quiet"]) == 1
                argv = ["jobs", "submit", "--server", url, "--prompt", "a red fox", "--seconds", "1", "--id", "cli-1",
                        "--watch", "--quiet"]
                assert await asyncio.to_thread(cli_main, argv) == 0
                out = tmp_path / "cli.mp4"
                assert await asyncio.to_thread(cli_main, ["jobs", "download", "cli-1", "-o", str(out), "--server", url]) == 0
                assert decoded_frames(out) == 16
                assert await asyncio.to_thread(cli_main, ["jobs", "show", "nope", "--server", url]) == 1
                (tmp_path / "bad.yaml").write_text("- at: 0\n  prompt: a\n- at: 0\n  prompt: b\n")
                bad = ["jobs", "submit", "--server", url, "--timeline", str(tmp_path / "bad.yaml")]
                assert await asyncio.to_thread(cli_main, bad) == 2  # refused locally, with file and line
            finally:
                del os.environ["STREAMGEN_TOKEN"]
            async with http.get(f"{url}/jobs/long-1", headers=auth) as r:
                assert (await r.json())["state"] == "cancelled"

    asyncio.run(asyncio.wait_for(main(), HANG_S * 2))


def test_a_live_session_preempts_a_job_which_resumes_bit_exact(tmp_path, backend) -> None:
    """One stream of capacity, held by a render job: a viewer's offer pauses the job at a chunk boundary
    (checkpointed, stream released) and gets its frames; the job resumes when the viewer leaves and its
    latents are still those of `streamgen render`."""
    from streamgen_client import StreamClient

    body = {"id": "long", "timeline": TIMELINE, "seconds": 12, "seed": 9}

    async def main() -> tuple[list[str], Path]:
        config = ServeConfig(port=0, model="tiny-random", threads=1, max_sessions=1, jobs_dir=tmp_path)
        async with Server(config) as server, aiohttp.ClientSession() as http:
            async with http.post(f"{server.url}/jobs", json=body) as r:
                assert r.status == 202
            store = server.jobs.store
            await asyncio.to_thread(wait_for, lambda: store.get("long").frames_done > 0, "the job running")
            async with StreamClient(server.url, prompt="a red fox") as viewer:
                await viewer.next_frame(timeout=HANG_S)  # admitted although the job held the only stream
                assert store.get("long").state in ("paused", "running")
            await asyncio.to_thread(wait_for, lambda: store.get("long").state in ("succeeded", "failed"), "the job")
            return [e.data["state"] if e.kind == "state" else e.kind for e in store.events("long")
                    if e.kind in ("state", "resumed")], store.job_dir("long")

    history, folder = asyncio.run(asyncio.wait_for(main(), HANG_S * 2))
    assert history[:4] == ["queued", "running", "paused", "running"] and history[4] == "resumed", history
    assert history[-1] == "succeeded" and "failed" not in history, history
    _, spec = parse_spec(body)
    assert torch.equal(load_latents(folder / "latents.safetensors")[0], reference_latents(spec, backend, tmp_path))
    assert decoded_frames(folder / "output.mp4") == round(12 * backend.bundle.fps)


# --- kill -9 of a real server ----------------------------------------------------------------------
def _serve(jobs_dir: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "STREAMGEN_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "streamgen.cli", "serve", "--port", "0", "--model", "tiny-random",
                             "--threads", "1", "--jobs-dir", str(jobs_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    match = re.search(r"http://\S+", line)
    assert match, f"no URL in {line!r}"
    return proc, match.group(0)


def _get(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_kill_9_mid_job_then_restart_finishes_bit_exact(tmp_path) -> None:
    import urllib.request

    seconds = 30
    proc, url = _serve(tmp_path / "jobs")
    try:
        body = json.dumps({"id": "k9", "prompt": "a red fox", "seconds": seconds, "seed": 7}).encode()
        req = urllib.request.Request(f"{url}/jobs", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 202
        job = wait_for(lambda: (j := _get(f"{url}/jobs/k9"))["progress"] >= 0.4 and j, "40 % progress", step=0.05)
        assert job["state"] == "running", job
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    proc, url = _serve(tmp_path / "jobs")
    try:
        job = wait_for(lambda: (j := _get(f"{url}/jobs/k9"))["state"] in ("succeeded", "failed") and j,
                       "the resumed job", step=0.2)
        assert job["state"] == "succeeded", job
        events = []
        with urllib.request.urlopen(f"{url}/jobs/k9/events", timeout=30) as r:
            events = [line.decode().strip() for line in r if line.startswith(b"event: ")]
        assert "event: resumed" in events and events.count("event: state") == 3  # queued, running, succeeded
    finally:
        proc.terminate()
        proc.wait(60)
    folder = tmp_path / "jobs" / "jobs" / "k9"
    reference = tmp_path / "reference.safetensors"
    subprocess.run([sys.executable, "-m", "streamgen.cli", "render", "--model", "tiny-random", "--threads", "1",
                    "--prompt", "a red fox", "--seconds", str(seconds), "--seed", "7", "--latents-out", str(reference),
                    "--quiet"], check=True, cwd=ROOT, timeout=600, capture_output=True)
    assert torch.equal(load_latents(folder / "latents.safetensors")[0], load_latents(reference)[0])
    assert decoded_frames(folder / "output.mp4") == round(seconds * 16)


def test_500_jobs_from_10_clients_across_a_restart_run_once_each(tmp_path) -> None:
    """Idempotent ids, a restart half way: every job succeeds, exactly once (its event log says so)."""
    clients, per_client = 10, 50

    async def submit_all(url: str, rounds: range) -> list[int]:
        async def client(c: int) -> list[int]:
            statuses = []
            async with aiohttp.ClientSession() as http:
                for i in rounds:
                    body = {"id": f"c{c}-{i}", "prompt": "a red fox", "seconds": 0.25, "seed": c * 1000 + i}
                    for _ in range(2 if i % 10 == 0 else 1):  # every tenth id submitted twice: the same job
                        async with http.post(f"{url}/jobs", json=body) as r:
                            statuses.append(r.status)
            return statuses

        return [s for got in await asyncio.gather(*(client(c) for c in range(clients))) for s in got]

    async def main() -> list[int]:
        config = ServeConfig(port=0, model="tiny-random", threads=1, jobs_dir=tmp_path, jobs_max_queued=1000,
                             jobs_concurrency=2)
        async with Server(config) as server:
            first = await submit_all(server.url, range(per_client // 2))
        async with Server(config) as server:  # the same jobs dir: queued and running jobs go on
            second = await submit_all(server.url, range(per_client // 2, per_client))
            store = server.jobs.store
            ids = [f"c{c}-{i}" for c in range(clients) for i in range(per_client)]
            await asyncio.to_thread(wait_for, lambda: all(store.get(j).state in ("succeeded", "failed") for j in ids),
                                    "500 jobs", HANG_S * 3)
            states = {j: store.get(j).state for j in ids}
            logs = {j: [e.data["state"] for e in store.events(j) if e.kind == "state"] for j in ids}
        assert set(states.values()) == {"succeeded"}, {s for s in states.values()}
        for j, log in logs.items():
            assert log.count("queued") == 1 and log.count("succeeded") == 1, (j, log)
        return first + second

    statuses = asyncio.run(asyncio.wait_for(main(), HANG_S * 4))
    assert statuses.count(202) == clients * per_client and statuses.count(200) == clients * per_client // 10
