"""The Ray backend: timestep-pipeline stages (`mode="tpp"`) or whole-stream placement
(`mode="placement"`) behind the same backend seam as `LocalBackend`.

Importing this package does not import Ray; the names below load on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["RayBackend", "PipelineConfig", "PlacementConfig", "connect", "add_ray_arguments",
           "backend_from_args", "make_backend", "ray_settings", "Pipeline", "PipelineFrameStream"]

_WHERE = {"RayBackend": "backend", "PipelineConfig": "pipeline_config", "Pipeline": "pipeline",
          "PipelineFrameStream": "pipeline_stream", "PlacementConfig": "placement",
          "connect": "cluster", "add_ray_arguments": "cluster", "backend_from_args": "cluster", "make_backend": "cluster", "ray_settings": "cluster"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
