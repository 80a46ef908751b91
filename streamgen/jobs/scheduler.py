"""Which job runs when: `concurrency` worker threads per node (so the server's event loop never runs a
chunk), each taking the highest-priority queued job (first submitted first within one priority).

On start, jobs left `running` by a previous process (a crash, a kill -9, a stop) are resumed first,
from their last checkpoint. `stop()` asks running jobs to checkpoint at their next chunk boundary
and leaves them `running`, so the next start resumes them.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ..backends.base import CapacityError
from ..render.job import frame_count
from . import runner
from .spec import JobSpec
from .store import Conflict, Job, JobStore
from .webhooks import WebhookPolicy, WebhookSender

log = logging.getLogger(__name__)

RETRY_S = 1.0  # wait before retrying a job the backend had no room for


class QueueFull(Exception):
    """Too many queued jobs; `limit` is how many may wait."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"too many queued jobs (limit {limit}); try again later")


@dataclass
class SchedulerConfig:
    concurrency: int = 1  # jobs running at once on this node
    max_queued: int = 100
    checkpoint_every: int = 4  # chunks
    webhook_allow: tuple[str, ...] = ()  # URL prefixes a job's webhook may lie under (none: webhooks refused)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_queued < 1 or self.checkpoint_every < 1:
            raise ValueError(f"jobs: concurrency, max queued and checkpoint interval must be ≥ 1, got {self.concurrency}, "
                             f"{self.max_queued}, {self.checkpoint_every}")


class JobScheduler:
    def __init__(self, store: JobStore, backend, config: SchedulerConfig | None = None) -> None:
        self.store, self.backend = store, backend
        self.config = config or SchedulerConfig()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._resume: list[str] = []  # running jobs to pick up before queued ones
        self._cancels: dict[str, threading.Event] = {}  # running here → its cancel flag
        self._preempts: dict[str, tuple[threading.Event, threading.Event]] = {}  # running here → (asked, released)
        self._threads: list[threading.Thread] = []
        self.webhooks = WebhookPolicy(self.config.webhook_allow)
        self._sender = WebhookSender(store) if self.webhooks.allow else None
        if self._sender is not None:
            store.listeners.append(self._sender.notify)

    # --- API side ----------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, job_id: str | None = None) -> tuple[Job, bool]:
        """(job, created); SpecError for what the model refuses, Conflict for a reused id, QueueFull."""
        runner.render_job(spec, self.backend.bundle)
        if spec.webhook is not None:
            self.webhooks.check(spec.webhook)
        existing = self.store.get(job_id) if job_id else None
        if existing is None and self.store.count("queued") >= self.config.max_queued:
            raise QueueFull(self.config.max_queued)
        job, created = self.store.submit(spec, frame_count(spec.seconds, self.backend.bundle.fps), job_id)
        if created:
            with self._wake:
                self._wake.notify()
        return job, created

    def cancel(self, job_id: str) -> Job:
        job = self.store.request_cancel(job_id)
        with self._wake:
            flag = self._cancels.get(job_id)
        if flag is not None:
            flag.set()
        return job

    def preempt(self, timeout: float = 60.0) -> bool:
        """Live sessions first: ask the running job claimed last to checkpoint at its next chunk boundary
        and give its stream back (it is `paused`, then resumed when there is room). True once a stream
        was released within `timeout`; False when no job runs here."""
        with self._wake:
            running = [flags for flags in self._preempts.values() if not flags[0].is_set()]
            if not running:
                return False
            asked, released = running[-1]
            asked.set()
        return released.wait(timeout)

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._resume = [j.id for j in reversed(self.store.list("running", limit=1_000_000))]  # oldest first
        for i in range(self.config.concurrency):
            t = threading.Thread(target=self._work, name=f"jobs-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 60.0) -> None:
        """Running jobs checkpoint at their next chunk and stay `running` (resumed by the next start)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self._sender is not None:
            self._sender.close()

    def _claim(self) -> tuple[Job, threading.Event] | None:
        """The next job to run, now `running`, with its cancel flag (registered under the same lock
        `cancel` looks it up with, so a cancel never falls between the two)."""
        with self._wake:
            job = None
            while self._resume and job is None:
                job = self.store.get(self._resume.pop(0))
                if job is not None and job.state == "paused":
                    try:
                        job = self.store.set_state(job.id, "running")
                    except Conflict:  # cancelled while paused
                        job = None
                job = job if job is not None and job.state == "running" else None
            if job is None:
                queued = self.store.next_queued()
                if queued is None:
                    return None
                try:
                    job = self.store.set_state(queued.id, "running")
                except Conflict:  # cancelled meanwhile
                    return None
            cancel = threading.Event()
            if job.cancel_requested:
                cancel.set()
            self._cancels[job.id] = cancel
            self._preempts[job.id] = (threading.Event(), threading.Event())
            return job, cancel

    def _work(self) -> None:
        while not self._stop.is_set():
            claimed = self._claim()
            if claimed is None:
                with self._wake:
                    self._wake.wait(1.0)
                continue
            job, cancel = claimed
            asked, released = self._preempts[job.id]
            try:
                runner.run(job, self.store, self.backend, self._stop, cancel, self.config.checkpoint_every, asked)
            except runner.Interrupted:
                pass
            except runner.Preempted:
                self.store.set_state(job.id, "paused")
                with self._wake:
                    self._resume.append(job.id)
                released.set()
                self._stop.wait(RETRY_S)  # the session that asked takes the stream first
            except CapacityError:  # no stream free (live sessions first): paused until there is one
                try:
                    self.store.set_state(job.id, "paused")
                except Conflict:
                    pass
                with self._wake:
                    self._resume.append(job.id)
                self._stop.wait(RETRY_S)
            except Exception as exc:  # a bug before the job's own error handling: the job fails, the worker goes on
                log.exception("job %s failed", job.id)
                try:
                    self.store.set_state(job.id, "failed", error=f"{type(exc).__name__}: {exc}")
                except Conflict:
                    pass
            finally:
                released.set()  # whatever ended the run, its stream is back
                with self._wake:
                    self._cancels.pop(job.id, None)
                    self._preempts.pop(job.id, None)
