"""The job store: one SQLite file (WAL) in the jobs dir — a row per submission and an append-only
event log whose ids are the SSE event ids (`Last-Event-ID` replays from them).

States: queued → running → succeeded | failed | cancelled, and running ⇄ paused (preempted);
a terminal state never changes again. Every state change and (throttled) progress is an event.
Outputs and checkpoints live under `job_dir(id)`; clients never name paths.
"""
from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import JobSpec

STATES = ("queued", "running", "paused", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
TRANSITIONS = {"queued": ("running", "cancelled"), "running": ("succeeded", "failed", "cancelled", "paused"),
               "paused": ("running", "cancelled")}

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    spec TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    frames_done INTEGER NOT NULL DEFAULT 0,
    frames_total INTEGER NOT NULL,
    frames_per_s REAL,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job, id);
"""


class Conflict(Exception):
    """A client id reused with another spec, or a transition a job's state does not allow."""


@dataclass(frozen=True)
class Job:
    id: str
    spec: JobSpec
    state: str
    frames_done: int
    frames_total: int
    frames_per_s: float | None  # generation speed of the current run
    error: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def eta_s(self) -> float | None:
        if self.state != "running" or not self.frames_per_s:
            return None
        return (self.frames_total - self.frames_done) / self.frames_per_s


@dataclass(frozen=True)
class Event:
    id: int
    job: str
    time: float
    kind: str  # state | progress | prompt | checkpoint
    data: dict[str, Any]


class JobStore:
    """Thread-safe (one connection behind a lock): the API's handlers and the runners' threads share it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # one server per jobs dir (two would both resume its jobs): the lock is held as long as the store
        self._owner = open(self.root / "lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._owner.close()
            raise ValueError(f"the jobs dir {self.root} is in use by another process (another streamgen serve?)") from None
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self.listeners: list[Callable[[Job], None]] = []  # told of every state change, after it is committed

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()  # releases the dir (so does the process's death, even by kill -9)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    # --- rows --------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, frames_total: int, job_id: str | None = None) -> tuple[Job, bool]:
        """(job, created): the same id with the same spec is the same job; with another spec, Conflict."""
        job_id = job_id or uuid.uuid4().hex
        text = spec.canonical()
        now = time.time()
        with self._lock, self._db:
            row = self._db.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                if row[0] != text:
                    raise Conflict(f"job {job_id!r} exists with another spec")
                created = False
            else:
                self._db.execute("INSERT INTO jobs (id, spec, priority, state, frames_total, created_at) "
                                 "VALUES (?, ?, ?, 'queued', ?, ?)", (job_id, text, spec.priority, frames_total, now))
                self._event(job_id, "state", {"state": "queued"}, now)
                created = True
        job = self.get(job_id)
        assert job is not None
        return job, created

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_job(r) for r in rows]

    def count(self, state: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]

    def next_queued(self) -> Job | None:
        """Highest priority first, first submitted first within one."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY priority DESC, seq "
                                   "LIMIT 1").fetchone()
        return None if row is None else _job(row)

    def set_state(self, job_id: str, state: str, error: str | None = None, **data: Any) -> Job:
        """Move a job to `state` (Conflict when its state does not allow it) and log the event."""
        now = time.time()
        with self._lock, self._db:
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if state not in TRANSITIONS.get(row[0], ()):
                raise Conflict(f"job {job_id!r} is {row[0]}: it cannot become {state}")
            self._db.execute("UPDATE jobs SET state = ?, error = ?, "
                             "started_at = CASE WHEN ? = 'running' THEN COALESCE(started_at, ?) ELSE started_at END, "
                             "finished_at = CASE WHEN ? IN ('succeeded', 'failed', 'cancelled') THEN ? ELSE NULL END "
                             "WHERE id = ?", (state, error, state, now, state, now, job_id))
            self._event(job_id, "state", {"state": state, **({"error": error} if error else {}), **data}, now)
        job = self.get(job_id)
        assert job is not None
        for listener in self.listeners:
            listener(job)
        return job

    def request_cancel(self, job_id: str) -> Job:
        """Cancel: a queued or paused job at once; a running one at its next chunk (its runner sees the flag)."""
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state in TERMINAL:
            raise Conflict(f"job {job_id!r} already {job.state}")
        with self._lock, self._db:
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        if job.state in ("queued", "paused"):
            try:
                return self.set_state(job_id, "cancelled")
            except Conflict:  # a runner picked it up meanwhile: it sees the flag
                pass
        job = self.get(job_id)
        assert job is not None
        return job

    def progress(self, job_id: str, done: int, frames_per_s: float | None, event: bool) -> None:
        """Record frames done (every chunk); `event` logs a progress event too (the caller throttles)."""
        now = time.time()
        with self._lock, self._db:
            total = self._db.execute("UPDATE jobs SET frames_done = ?, frames_per_s = ? WHERE id = ? "
                                     "RETURNING frames_total", (done, frames_per_s, job_id)).fetchone()[0]
            if event:
                eta = (total - done) / frames_per_s if frames_per_s else None
                self._event(job_id, "progress", {"frames_done": done, "frames_total": total, "frames_per_s": frames_per_s,
                                                  "eta_s": eta}, now)

    # --- events ------------------------------------------------------------------------------------
    def log(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._event(job_id, kind, data, time.time())

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT id, job, time, kind, data FROM events WHERE job = ? AND id > ? ORDER BY id "
                                    "LIMIT ?", (job_id, after, limit)).fetchall()
        return [Event(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def _event(self, job_id: str, kind: str, data: dict[str, Any], now: float) -> None:
        self._db.execute("INSERT INTO events (job, time, kind, data) VALUES (?, ?, ?, ?)",
                         (job_id, now, kind, json.dumps(data, separators=(",", ":"))))


_COLUMNS = ("id, spec, state, frames_done, frames_total, frames_per_s, error, cancel_requested, created_at, started_at, "
            "finished_at")


def _job(row: tuple) -> Job:
    return Job(row[0], JobSpec.from_json(row[1]), row[2], row[3], row[4], row[5], row[6], bool(row[7]), row[8], row[9],
               row[10])
