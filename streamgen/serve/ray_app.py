"""Ray Serve entry point for KubeRay's RayService (`cluster/kuberay/rayservice.yaml`).

One Serve replica (pinned to the head by the custom resource `streamgen_server`) runs the streamgen
server — HTTP signaling and WebRTC on $STREAMGEN_PORT, the Ray driver of a `RayBackend` whose
stages / workers run on the GPU worker group — in a background event loop. Serve's own route
answers with the backend's stats, and `check_health` fails when the server stopped, so KubeRay
restarts it. Settings come from environment variables (STREAMGEN_MODEL, STREAMGEN_PORT,
STREAMGEN_RAY_MODE, STREAMGEN_RAY_STAGES, STREAMGEN_RAY_GPUS, STREAMGEN_RAY_CPUS,
STREAMGEN_RAY_KV_BUDGET_GB, STREAMGEN_MAX_SESSIONS).

Needs `ray[serve]` (the Ray images have it) and the server's backend settings
(`ServeConfig.backend` / `ServeConfig.ray`, see the Ray backend's integration notes).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Any

from ray import serve


def _settings() -> dict[str, Any]:
    """From the environment: STREAMGEN_HOST (default 0.0.0.0, which needs STREAMGEN_TOKEN or STREAMGEN_TOKEN_FILE:
    the server refuses an exposed bind without a token), STREAMGEN_PORT, STREAMGEN_MODEL, STREAMGEN_RAY_*."""
    from .limits import read_token

    env = os.environ.get
    return {
        "host": env("STREAMGEN_HOST", "0.0.0.0"), "token": read_token(env("STREAMGEN_TOKEN_FILE")),
        "port": int(env("STREAMGEN_PORT", "8080")), "model": env("STREAMGEN_MODEL", "tiny-random"),
        "max_sessions": int(env("STREAMGEN_MAX_SESSIONS", "8")), "backend": "ray",
        "ray": {"ray_address": "auto", "ray_mode": env("STREAMGEN_RAY_MODE", "tpp"),
                "ray_stages": int(env("STREAMGEN_RAY_STAGES", "2")), "ray_gpus": float(env("STREAMGEN_RAY_GPUS", "1")),
                "ray_cpus": float(env("STREAMGEN_RAY_CPUS", "4")),
                "ray_kv_budget_gb": float(env("STREAMGEN_RAY_KV_BUDGET_GB", "16"))},
    }


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class StreamgenServer:
    def __init__(self) -> None:
        from .config import ServeConfig
        from .server import Server

        known = {f.name for f in dataclasses.fields(ServeConfig)}
        self.config = ServeConfig(**{k: v for k, v in _settings().items() if k in known})
        self.server = Server(self.config)
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamgen-server", daemon=True)
        self._thread.start()
        self._ready.wait(600)

    def _run(self) -> None:
        async def main() -> None:
            async with self.server:
                self._ready.set()
                await asyncio.Event().wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by check_health
            self.error = exc
            self._ready.set()

    def check_health(self) -> None:
        if self.error is not None or not self._thread.is_alive():
            raise RuntimeError(f"streamgen server stopped: {self.error!r}")

    async def __call__(self, request) -> dict[str, Any]:
        backend = self.server.backend
        return {"status": "ok", "server": self.server.url, "backend": backend.stats() if backend is not None else None}


app = StreamgenServer.bind()
