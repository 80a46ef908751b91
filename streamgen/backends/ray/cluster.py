"""Start-or-join a Ray cluster, and the command-line options of the Ray backend.

`connect("auto")` joins the cluster this machine belongs to (`ray start` / `ray up` / KubeRay head,
found through RAY_ADDRESS or the local session) and starts a private local instance when there is
none; `connect(None)` / `"local"` always starts a local one; any other address (`host:6379`,
`ray://host:10001`) must be reachable. A local instance is sized for this machine and keeps the
object store small (spec ecosystem §2: the default takes 30% of RAM).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE = 512 * 1024**2


def connect(address: str | None = "auto", *, num_cpus: int | None = None, num_gpus: int | None = None,
            object_store_memory: int | None = None, namespace: str = "streamgen", **init_kwargs: Any) -> dict[str, Any]:
    """Join or start Ray; returns {"address", "joined", "resources"}. Idempotent."""
    import ray

    os.environ.setdefault("RAY_CGRAPH_teardown_timeout", "2")  # never a 30 s compiled-graph teardown hang
    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "joined": None, "resources": ray.cluster_resources()}
    local = dict(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, namespace=namespace,
                 object_store_memory=object_store_memory or LOCAL_OBJECT_STORE, **init_kwargs)
    if address in (None, "", "local"):
        ray.init(**local)
        joined = False
    else:
        try:
            ray.init(address=address, namespace=namespace, **init_kwargs)
            joined = True
        except ConnectionError:
            if address != "auto":
                raise ConnectionError(f"no Ray cluster at {address!r} (start one with `ray start --head`, "
                                      "`ray up cluster/ray-up.yaml`, or use --ray-address auto)") from None
            log.info("no running Ray cluster found: starting a local one")
            ray.init(**local)
            joined = False
    return {"address": ray.get_runtime_context().gcs_address, "joined": joined, "resources": ray.cluster_resources()}


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`--backend local|ray` and the Ray options, for `streamgen serve` and `streamgen render`."""
    g = parser.add_argument_group("backend")
    g.add_argument("--backend", choices=("local", "ray"), default="local", help="where streams run (default: in process)")
    g.add_argument("--ray-address", default="auto",
                   help="Ray cluster to join: auto (join the running one, else start locally), local, host:port, ray://…")
    g.add_argument("--ray-mode", choices=("tpp", "placement"), default="tpp",
                   help="tpp: denoising steps split across stage actors; placement: whole streams on worker actors")
    g.add_argument("--ray-stages", "--stages", type=int, default=2, help="tpp: stage actors per pipeline")
    g.add_argument("--ray-pipelines", type=int, default=1, help="tpp: pipelines (each its own placement group)")
    g.add_argument("--ray-workers", type=int, default=2, help="placement: worker actors")
    g.add_argument("--ray-cpus", type=float, help="CPUs per stage / worker actor (default: what fits the cluster, at most 1)")
    g.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per stage / worker actor")
    g.add_argument("--ray-kv-budget-gb", type=float, default=2.0, help="KV budget per stage / worker (GiB)")
    g.add_argument("--ray-max-sessions", type=int, help="streams per pipeline / worker (default: --max-sessions)")


def make_backend(bundle, backend: str = "local", *, max_streams: int = 4, scheduler: str = "engine", ray_address: str | None = "auto",
                 ray_mode: str = "tpp", ray_stages: int = 2, ray_pipelines: int = 1, ray_workers: int = 2,
                 ray_cpus: float | None = None, ray_gpus: float = 0.0, ray_kv_budget_gb: float = 2.0,
                 ray_max_sessions: int | None = None):
    """The backend a server or render job asked for: `LocalBackend(bundle, max_streams)` or a
    `RayBackend` joined to (or starting) the cluster at `ray_address`. Ray actors load the bundle
    themselves from `bundle.spec` (name, model dir, dtype, quantization, compile: what `load_bundle`
    resolved here, after checking the model dir), or by name for bundles built otherwise."""
    if backend == "local":
        from ..local import LocalBackend

        return LocalBackend(bundle, max_streams=max_streams, scheduler=scheduler)
    if backend != "ray":
        raise ValueError(f"unknown backend {backend!r}; known: local, ray")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install 'streamgen[ray]'") from None
    from .backend import RayBackend
    from .pipeline_config import PipelineConfig
    from .placement import PlacementConfig

    if ray_cpus is None:  # fit the actors on the cluster's CPUs (at most one each) rather than wait forever
        cluster_cpus = connect(ray_address)["resources"].get("CPU", 1.0)
        actors = ray_stages * ray_pipelines if ray_mode == "tpp" else ray_workers
        decoders = 0.1 * ray_pipelines if ray_mode == "tpp" else 0.0
        ray_cpus = max(0.1, min(1.0, (cluster_cpus - decoders) / actors))
    res: dict[str, Any] = {"num_cpus": ray_cpus, **({"num_gpus": ray_gpus} if ray_gpus else {})}
    budget = int(ray_kv_budget_gb * 1024**3)
    sessions = ray_max_sessions or max_streams
    recipe = bundle.spec or bundle.name
    return RayBackend(bundle, mode=ray_mode, address=ray_address, replicas=ray_pipelines,
                      pipeline=PipelineConfig(model=recipe, stages=ray_stages, stage_resources=res,
                                              kv_budget_bytes=budget, max_sessions=sessions),
                      placement=PlacementConfig(model=recipe, workers=ray_workers, worker_resources=res,
                                                memory_budget_bytes=budget, max_sessions_per_worker=sessions))


def ray_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `make_backend` keywords of the options `add_ray_arguments` defines (for a config object)."""
    return {k: getattr(args, k) for k in ("ray_address", "ray_mode", "ray_stages", "ray_pipelines", "ray_workers",
                                          "ray_cpus", "ray_gpus", "ray_kv_budget_gb", "ray_max_sessions")}


def backend_from_args(args: argparse.Namespace, bundle, max_streams: int = 4):
    """`make_backend` from the options `add_ray_arguments` defines."""
    return make_backend(bundle, getattr(args, "backend", "local"), max_streams=max_streams, **ray_settings(args))
