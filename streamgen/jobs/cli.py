"""`streamgen jobs submit|list|show|watch|cancel|download --server URL`: render jobs on a `streamgen serve`.

    streamgen jobs submit --prompt "a red circle moving left" --seconds 60 --priority 5 --watch
    streamgen jobs submit --timeline story.yaml --seconds 30 --id story-1     # same id + same spec: same job
    streamgen jobs watch story-1        # progress bar from the job's event stream
    streamgen jobs download story-1 -o story.mp4

The token comes from --token-file FILE or $STREAMGEN_TOKEN, as for the server. Exit status: 0 done;
1 the job failed or was cancelled (watch), or the server refused; 2 bad arguments.
Only the standard library at import: building the `streamgen` parser imports no torch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..datadir import user_data_dir

DEFAULT_SERVER = "http://127.0.0.1:8080"
TOKEN_ENV = "STREAMGEN_TOKEN"


def add_serve_jobs_arguments(serve: argparse.ArgumentParser) -> None:
    """`streamgen serve`'s render-job options (read back by `serve_jobs_settings`)."""
    g = serve.add_argument_group("render jobs (/jobs)")
    g.add_argument("--jobs-dir", type=Path, default=user_data_dir("jobs"), metavar="DIR",
                   help="their SQLite store, checkpoints and outputs (default %(default)s)")
    g.add_argument("--jobs-concurrency", type=int, default=1, metavar="N",
                   help="render jobs running at once on this server (default %(default)s)")
    g.add_argument("--jobs-max-queued", type=int, default=100, metavar="N",
                   help="more queued jobs are refused with HTTP 429 (default %(default)s)")
    g.add_argument("--webhook-allow", action="append", default=[], metavar="URL_PREFIX",
                   help="a job's `webhook` must lie under one of these prefixes (repeatable; same scheme, host, "
                        "port, and a path under the prefix's); none: webhooks are refused")


def serve_jobs_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `ServeConfig` fields of `add_serve_jobs_arguments`."""
    return {"jobs_dir": args.jobs_dir, "jobs_concurrency": args.jobs_concurrency, "jobs_max_queued": args.jobs_max_queued,
            "jobs_webhook_allow": tuple(args.webhook_allow)}


class ServerError(Exception):
    """The server answered an error (`status`, its one-line message)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


class Client:
    """The jobs API over urllib."""

    def __init__(self, server: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.server, self.token, self.timeout = server.rstrip("/"), token, timeout

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method, headers={
            **({"Content-Type": "application/json"} if data else {}),
            **({"Authorization": f"Bearer {self.token}"} if self.token else {}), **(headers or {})})
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            raise ServerError(exc.code, message) from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        with self.request(method, path, body) as r:
            return json.loads(r.read())

    def events(self, job_id: str, after: int = 0):
        """(id, kind, data) of the job's event stream until it ends (the job's terminal state)."""
        with self.request("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(after)}, timeout=3600) as r:
            event: dict[str, str] = {}
            for raw in r:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if "data" in event:
                        yield int(event.get("id", 0)), event.get("event", "message"), json.loads(event["data"])
                    event = {}
                    continue
                key, _, value = line.partition(":")
                event[key] = value.lstrip(" ")


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        lines = Path(args.token_file).read_text().strip().splitlines()
        return lines[0].strip() if lines else None
    return os.environ.get(TOKEN_ENV) or None


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    from ..render.timeline import (
        load_timeline,  # errors with file and line, before anything is sent
    )

    body: dict[str, Any] = {"seconds": args.seconds}
    if args.timeline is not None:
        body["timeline"] = [e.to_dict() for e in load_timeline(args.timeline)]
    settings = {"prompt": args.prompt, "id": args.id, "seed": args.seed, "schedule": args.schedule,
                "policy": args.policy, "fps": args.fps, "size": args.size, "crf": args.crf, "preset": args.preset,
                "priority": args.priority, "model": args.model, "webhook": args.webhook}
    body.update({k: v for k, v in settings.items() if v is not None})
    if args.policy_setting:
        import yaml

        body["policy_settings"] = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.policy_setting)}
    return body


def watch(client: Client, job_id: str, quiet: bool = False) -> int:
    """A progress bar until the job ends; 0 when it succeeded."""
    from tqdm import tqdm

    job = client.json("GET", f"/jobs/{job_id}")
    bar = tqdm(total=job["frames_total"], initial=job["frames_done"], unit="frame", desc=job_id[:16], disable=quiet,
               dynamic_ncols=True, file=sys.stderr)
    state, error = job["state"], job.get("error")
    try:
        for _, kind, data in client.events(job_id):
            if kind == "progress":
                bar.update(data["frames_done"] - bar.n)
                if data.get("frames_per_s"):
                    bar.set_postfix(fps=f"{data['frames_per_s']:.1f}", eta=f"{data.get('eta_s') or 0:.0f}s")
            elif kind == "state":
                state, error = data["state"], data.get("error", error)
                bar.set_description(f"{job_id[:16]} {state}")
    finally:
        bar.close()
    print(f"{job_id}: {state}" + (f": {error}" if error else ""))
    return 0 if state == "succeeded" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    client = Client(args.server, _token(args))
    try:
        if args.jobs == "submit":
            out = client.json("POST", "/jobs", _spec(args))
            print(out["id"])
            return watch(client, out["id"], args.quiet) if args.watch else 0
        if args.jobs == "list":
            query = "&".join(f"{k}={v}" for k, v in (("state", args.state), ("limit", args.limit)) if v)
            for j in client.json("GET", "/jobs" + (f"?{query}" if query else ""))["jobs"]:
                print(f"{j['id']}  {j['state']:<9}  {j['frames_done']}/{j['frames_total']}  priority {j['priority']}"
                      + (f"  {j['error']}" if j["error"] else ""))
            return 0
        if args.jobs == "show":
            print(json.dumps(client.json("GET", f"/jobs/{args.id}"), indent=2))
            return 0
        if args.jobs == "watch":
            return watch(client, args.id, args.quiet)
        if args.jobs == "cancel":
            print(f"{args.id}: {client.json('DELETE', f'/jobs/{args.id}')['state']} (cancel requested)")
            return 0
        with client.request("GET", f"/jobs/{args.id}/output", timeout=600) as r, open(args.out, "wb") as f:  # download
            shutil.copyfileobj(r, f)
        print(f"{args.id} → {args.out}")
        return 0
    except ServerError as exc:
        print(f"streamgen jobs: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a timeline file refused here (file, line, reason) before anything is sent
        print(f"streamgen jobs: error: {exc}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"streamgen jobs: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1


def add_jobs_parser(subparsers) -> argparse.ArgumentParser:
    """Add `jobs` to a `streamgen` subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=DEFAULT_SERVER, help=f"a `streamgen serve` (default {DEFAULT_SERVER})")
    common.add_argument("--token-file", metavar="FILE", help=f"bearer token file (default: ${TOKEN_ENV})")
    p = subparsers.add_parser("jobs", help="render jobs on a server: submit, list, show, watch, cancel, download",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="jobs", required=True)
    submit = sub.add_parser("submit", parents=[common], help="queue a render (prints its id)")
    submit.add_argument("--prompt")
    submit.add_argument("--timeline", type=Path, metavar="FILE", help="JSON or YAML list of {at, prompt, transition?}")
    submit.add_argument("--seconds", type=float, default=5.0)
    submit.add_argument("--id", help="your id for the job: submitting the same id and spec again is the same job")
    submit.add_argument("--priority", type=int, help="higher runs first (default 0)")
    submit.add_argument("--model", help="refused unless it is the server's model")
    submit.add_argument("--webhook", metavar="URL", help="POSTed the job's state changes (the server must allow the URL "
                                                         "with --webhook-allow)")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--schedule", choices=("exact", "timestep-slot"))
    submit.add_argument("--policy")
    submit.add_argument("--policy-setting", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--fps", type=float, help="container frame rate (default: the model's)")
    submit.add_argument("--size", metavar="N|WxH")
    submit.add_argument("--crf", type=int)
    submit.add_argument("--preset")
    submit.add_argument("--watch", action="store_true", help="then show its progress until it ends")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")
    lst = sub.add_parser("list", parents=[common], help="jobs, newest first")
    lst.add_argument("--state", choices=("queued", "running", "paused", "succeeded", "failed", "cancelled"))
    lst.add_argument("--limit", type=int)
    for name, text in (("show", "a job's state as JSON"), ("watch", "a progress bar until the job ends"),
                       ("cancel", "cancel at the next chunk"), ("download", "the finished MP4")):
        one = sub.add_parser(name, parents=[common], help=text)
        one.add_argument("id")
        if name == "watch":
            one.add_argument("--quiet", action="store_true")
        if name == "download":
            one.add_argument("-o", "--out", type=Path, required=True)
    p.set_defaults(func=cmd_jobs)
    return p
