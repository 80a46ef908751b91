"""Server lifecycle: load the model, set torch threads, bind, and close every session on the way out."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

import torch
from aiohttp import web

from ..backends import Backend
from ..backends.ray.cluster import make_backend
from ..bundles.bundle import load_bundle
from ..jobs.api import add_job_routes
from ..jobs.scheduler import JobScheduler, SchedulerConfig
from ..jobs.store import JobStore
from . import ice
from .app import create_app
from .config import ServeConfig
from .limits import check_exposure
from .manager import SessionManager
from .metrics import Metrics

log = logging.getLogger(__name__)


class Server:
    """`async with Server(config) as server:` serves at `server.url` (port 0 picks a free one)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.backend: Backend | None = None
        self.manager: SessionManager | None = None
        self.jobs: JobScheduler | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._undo: list[Callable[[], None]] = []  # process-wide settings restored on stop

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        config = self.config
        check_exposure(config.host, config.token)
        ice.ice_servers(config.ice_servers)  # refuse bad URLs before binding
        store = JobStore(config.jobs_dir) if config.jobs_dir is not None else None  # a jobs dir in use: refused first
        threads = torch.get_num_threads()
        torch.set_num_threads(config.torch_threads())
        self._undo.append(lambda: torch.set_num_threads(threads))
        if ice.is_loopback(config.host):
            self._undo.append(ice.use_loopback_candidates())
        bundle = await asyncio.to_thread(load_bundle, config.model, config.model_dir, **config.precision)
        self.backend = await asyncio.to_thread(make_backend, bundle, config.backend, max_streams=config.max_sessions,
                                            scheduler=config.scheduler, **config.ray)
        self.manager = SessionManager(self.backend, config, self.metrics)
        self.manager.start()
        app = create_app(config, self.backend, self.manager, self.metrics)
        if store is not None:  # running jobs left by a previous process resume from their checkpoints
            self.jobs = JobScheduler(store, self.backend, SchedulerConfig(config.jobs_concurrency, config.jobs_max_queued,
                                                                        webhook_allow=config.jobs_webhook_allow))
            self.jobs.start()
            self.manager.preempt = self.jobs.preempt
            add_job_routes(app, self.jobs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.host, config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("serving %s (%s, %g fps) at %s", bundle.name, bundle.description, bundle.fps, self.url)

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.jobs is not None:  # running jobs checkpoint and stay resumable
            await asyncio.to_thread(self.jobs.stop)
            self.jobs.store.close()
        shutdown = getattr(self.backend, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown)
        while self._undo:
            self._undo.pop()()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_forever(config: ServeConfig) -> None:
    """Run until SIGINT/SIGTERM (the `streamgen serve` command)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)

    on_signals()
    async with Server(config) as server:
        on_signals()  # again: ray.init installs its own SIGTERM handler, which aborts the process
        print(f"streamgen serve: {server.url} (model {config.model}; Ctrl-C stops)", flush=True)
        await stop.wait()
