"""Render jobs as a service: `streamgen render` runs queued on a server, checkpointed, resumable bit for bit.

- `spec.py` — the JSON spec a client submits, validated field by field (the render timeline's own checks)
- `store.py` — SQLite (WAL) rows per job, states, progress, the append-only event log
- `checkpoint.py` — a stream's whole state at a chunk boundary, written atomically
- `segments.py` — committed closed-GOP MP4 segments, joined without re-encoding
- `runner.py` — one job's chunk loop: segments, checkpoints, resume, cancel
- `scheduler.py` — priorities, the per-node concurrency limit, worker threads, resume on start
- `api.py` — the `/jobs` routes `streamgen serve` adds
- `cli.py` — `streamgen jobs …` (standard library only: the `streamgen` parser imports no torch)
"""
