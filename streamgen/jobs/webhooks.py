"""Job webhooks: a job may name a URL that is told of its state changes — only a URL under a prefix the
server's operator allowed at start (`streamgen serve --webhook-allow https://hooks.example.com/streamgen/`),
so a client cannot make the server send requests where it likes (request forgery).

- Allowed: same scheme, host (case-insensitive) and port as an allowed prefix, and a path under the
  prefix's path at a segment boundary. No allow-list: webhooks are refused.
- Delivery: one daemon thread per server posts `{"id", "state", "frames_done", "frames_total", "error",
  "links"}` as JSON on `running`, `paused`, `succeeded`, `failed`, `cancelled`; a 2xx is delivered, anything
  else is retried ATTEMPTS times with doubling waits; redirects are not followed (a redirect could leave the
  allow-list). Each delivery's outcome is logged in the job's event log (`webhook` events), and nothing of
  it ever blocks or fails the job.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from .spec import SpecError, check_url
from .store import Job, JobStore

log = logging.getLogger(__name__)

NOTIFY_STATES = ("running", "paused", "succeeded", "failed", "cancelled")
ATTEMPTS = 3
FIRST_RETRY_S = 0.5
TIMEOUT_S = 5.0


def _origin_and_path(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port, parts.path or "/"


class WebhookPolicy:
    """The operator's allow-list of URL prefixes."""

    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        self.allow = tuple(check_url(prefix) for prefix in allow)

    def check(self, url: str) -> None:
        """Raise SpecError (`webhook`) unless `url` lies under an allowed prefix."""
        if not self.allow:
            raise SpecError("webhook", "webhooks are off on this server (its operator starts it with --webhook-allow PREFIX)")
        scheme, host, port, path = _origin_and_path(check_url(url))
        for prefix in self.allow:
            p_scheme, p_host, p_port, p_path = _origin_and_path(prefix)
            under = path == p_path or path.startswith(p_path if p_path.endswith("/") else p_path + "/")
            if (scheme, host, port) == (p_scheme, p_host, p_port) and under:
                return
        raise SpecError("webhook", "this URL is not under any prefix the server allows for webhooks")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401  (urllib's hook)
        return None  # the 3xx surfaces as an HTTPError: not delivered


class WebhookSender:
    """Posts job notifications from one background thread; `notify(job)` never blocks."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._opener = urllib.request.build_opener(_NoRedirects)
        self._thread = threading.Thread(target=self._run, name="job-webhooks", daemon=True)
        self._thread.start()

    def notify(self, job: Job) -> None:
        if job.spec.webhook and job.state in NOTIFY_STATES:
            body = {"id": job.id, "state": job.state, "frames_done": job.frames_done, "frames_total": job.frames_total,
                    "error": job.error, "links": {"self": f"/jobs/{job.id}", "output": f"/jobs/{job.id}/output"}}
            self._queue.put((job.spec.webhook, body))

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (within `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            url, body = item
            outcome = self._deliver(url, body)
            try:
                self.store.log(body["id"], "webhook", {"state": body["state"], **outcome})
            except Exception:  # the store closed under us at shutdown: nothing to record into
                log.debug("webhook outcome of %s not logged", body["id"], exc_info=True)

    def _deliver(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        wait, error = FIRST_RETRY_S, ""
        for attempt in range(1, ATTEMPTS + 1):
            req = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "streamgen-webhook"})
            try:
                with self._opener.open(req, timeout=TIMEOUT_S) as resp:
                    return {"delivered": True, "status": resp.status, "attempts": attempt}
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}" + (" (redirects are not followed)" if 300 <= exc.code < 400 else "")
                if 300 <= exc.code < 500 and exc.code != 429:
                    break  # the receiver will not change its mind
            except (urllib.error.URLError, OSError) as exc:
                error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt < ATTEMPTS:
                time.sleep(wait)
                wait *= 2
        return {"delivered": False, "error": error, "attempts": attempt}
