"""Samplers as generators of DiT requests, so one engine loop can batch the calls of many streams.

A sampler's `steps(...)` generator yields `FlowRequest`s — (x, t, call) — and is sent each one's flow
prediction; its return value is the sampler's result. `run_with(flow, steps)` drives such a generator
with a plain callable: the same sampler code serves the engine loop, parity runners and training.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

from torch import Tensor

from ..cache.kv import CallSpec

R = TypeVar("R")
FlowRequest = tuple[Tensor, Tensor, CallSpec]  # (x [B,F,C,H,W], t [B,F], call)
Steps = Generator[FlowRequest, Tensor, R]
Flow = Callable[[Tensor, Tensor, CallSpec], Tensor]


def run_with(flow: Flow, steps: Steps[R]) -> R:
    """Answer every request of `steps` with `flow(...)` in order; returns what the generator returns."""
    try:
        request = next(steps)
        while True:
            request = steps.send(flow(*request))
    except StopIteration as stop:
        return stop.value
