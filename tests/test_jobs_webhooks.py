"""Job webhooks: only URLs under the operator's allow-list, a notification per state change delivered to a
real local HTTP receiver, redirects never followed, failures logged and never touching the job."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streamgen.backends.local import LocalBackend
from streamgen.bundles.bundle import load_bundle
from streamgen.jobs.scheduler import JobScheduler, SchedulerConfig
from streamgen.jobs.spec import SpecError, parse_spec
from streamgen.jobs.store import JobStore
from streamgen.jobs.webhooks import WebhookPolicy

from .test_jobs import wait_for


class Receiver:
    """A real HTTP server on loopback: records POSTs; /moved answers 302 to /elsewhere."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.posts.append((self.path, body))
                if self.path.endswith("/moved"):
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{outer.port}/elsewhere")
                else:
                    self.send_response(204 if "/gone" not in self.path else 410)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def test_urls_must_lie_under_an_allowed_prefix() -> None:
    policy = WebhookPolicy(("https://hooks.example.com/sg/",))
    policy.check("https://HOOKS.example.com:443/sg/job-done")
    for url, reason in (("https://hooks.example.com/sgx", "not under"), ("http://hooks.example.com/sg/x", "not under"),
                        ("https://hooks.example.com.evil.net/sg/x", "not under"), ("https://hooks.example.com:8443/sg/x", "not under"),
                        ("https://hooks.example.com/sg/../admin", "'..'"), ("https://u:p@hooks.example.com/sg/x", "credentials"),
                        ("file:///etc/passwd", "http"), ("x" * 3000, "at most")):
        with pytest.raises(SpecError, match=reason) as err:
            policy.check(url)
        assert err.value.field == "webhook"
    with pytest.raises(SpecError, match="webhooks are off"):
        WebhookPolicy().check("https://hooks.example.com/sg/x")
    with pytest.raises(SpecError, match="http"):
        parse_spec({"prompt": "a fox", "seconds": 1, "webhook": "ftp://x/y"})


def test_state_changes_are_posted_and_redirects_are_not_followed(tmp_path, receiver, one_thread) -> None:
    backend = LocalBackend(load_bundle("tiny-random"))
    store = JobStore(tmp_path)
    scheduler = JobScheduler(store, backend, SchedulerConfig(webhook_allow=(receiver.url("/hooks/"),)))
    with pytest.raises(SpecError, match="not under"):
        scheduler.submit(parse_spec({"prompt": "a fox", "seconds": 0.5, "webhook": receiver.url("/other/x")})[1], "bad")
    assert store.get("bad") is None  # refused before anything was stored
    for job_id, path in (("ok", "/hooks/done"), ("moved", "/hooks/moved"), ("gone", "/hooks/gone")):
        scheduler.submit(parse_spec({"prompt": "a red fox", "seconds": 0.5, "webhook": receiver.url(path)})[1], job_id)
    scheduler.start()
    try:
        wait_for(lambda: all(store.get(j).state == "succeeded" for j in ("ok", "moved", "gone")), "the jobs")
        wait_for(lambda: sum(e.kind == "webhook" for j in ("ok", "moved", "gone") for e in store.events(j)) == 6,
                 "every webhook outcome")
    finally:
        scheduler.stop()
        backend.shutdown()
    done = [body for path, body in receiver.posts if path == "/hooks/done"]
    assert [b["state"] for b in done] == ["running", "succeeded"]
    assert done[-1]["id"] == "ok" and done[-1]["frames_done"] == done[-1]["frames_total"] > 0
    assert not any(path == "/elsewhere" for path, _ in receiver.posts)  # the 302 was not followed
    outcomes = {j: [e.data for e in store.events(j) if e.kind == "webhook"] for j in ("ok", "moved", "gone")}
    assert all(o["delivered"] and o["status"] == 204 for o in outcomes["ok"])
    assert all(not o["delivered"] and "redirects are not followed" in o["error"] for o in outcomes["moved"])
    assert all(not o["delivered"] and o["attempts"] == 1 for o in outcomes["gone"])  # a 410 is not retried
