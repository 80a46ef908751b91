"""`streamgen bench engine --model NAME`: a family's real architecture with random weights."""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..bundles.family import (
    FamilySpec,
    build_policy,
    load_family_config,
    reduced_architecture,
)


def add_bench_model_options(parser: argparse.ArgumentParser) -> None:
    """`--model NAME --size WxH` for `streamgen bench engine` (see `bench_setup_from_args`)."""
    parser.add_argument("--model", help="model family / architecture from streamgen/configs/models (e.g. wan2.1-t2v-1.3b): "
                                        "its real DiT dims and stream settings with random weights (no files are read); "
                                        "--layers/--dim/--heads reduce it")
    parser.add_argument("--size", help="with --model: video size WIDTHxHEIGHT in pixels (default: the family's, 832x480)")


def bench_engine_setup(model: str | FamilySpec, size: str | None = None, *, layers: int | None = None,
                       dim: int | None = None, heads: int | None = None, ffn_dim: int | None = None,
                       policy: str | None = None, policy_settings: Mapping[str, Any] | None = None,
                       sampler: str | None = None, schedule: str | None = None, steps: list[float] | None = None,
                       batch_slots: bool = True, seed: int = 0, chunks: int | None = None):
    """(DiTConfig, StreamConfig) for `bench.engine.EngineBench` from a registry name.

    The family's architecture, optionally reduced (`reduced_architecture`), and its stream settings; a
    given `policy` replaces the family's policy and settings, `policy_settings` alone update them.
    A `full` policy cannot run more chunks than its capacity: that is refused up front.
    """
    spec = load_family_config(model)
    spec.require_streamable("be benchmarked")
    cfg = reduced_architecture(spec, layers=layers, dim=dim, heads=heads, ffn_dim=ffn_dim)
    if policy is not None and policy != spec.stream.policy:
        settings = dict(policy_settings or {})
    else:
        policy = spec.stream.policy
        settings = {**spec.stream.policy_settings, **dict(policy_settings or {})}
    overrides: dict[str, Any] = dict(policy=policy, policy_settings=settings, batch_slots=batch_slots, seed=seed)
    if sampler is not None:
        overrides["sampler"] = sampler
    if schedule is not None:
        overrides["schedule"] = schedule
    if steps:
        overrides["steps"] = tuple(steps)
    stream = spec.stream_config(spec.latent_size(size), **overrides)
    pol = build_policy(stream.policy, stream.policy_settings)
    if chunks is not None and stream.policy == "full" and chunks * stream.chunk_frames > pol.capacity_frames:
        raise ValueError(
            f"{spec.name} runs policy 'full' ({pol.capacity_frames} frames = {pol.capacity_frames // stream.chunk_frames} "
            f"chunks); {chunks} chunks do not fit: pass --chunks {pol.capacity_frames // stream.chunk_frames}, or a bounded "
            "policy, e.g. --policy window_sink --policy-setting capacity_frames=21 --policy-setting sink_frames=3")
    return cfg, stream


def bench_setup_from_args(args: argparse.Namespace):
    """(DiTConfig, StreamConfig) for `bench engine` when `--model` is given, else None.

    Reads --model --size and the existing --layers --dim --heads --ffn-dim --policy
    --policy-setting --sampler --schedule --steps --unbatched --seed --chunks (None = the family's).
    """
    if getattr(args, "model", None) is None:
        return None
    return bench_engine_setup(
        args.model, args.size, layers=args.layers, dim=args.dim, heads=args.heads, ffn_dim=args.ffn_dim,
        policy=args.policy, policy_settings=dict(args.policy_setting), sampler=args.sampler, schedule=args.schedule,
        steps=args.steps, batch_slots=not args.unbatched, seed=args.seed, chunks=args.chunks)


def bench_decoder(args: argparse.Namespace):
    """The frame-decoder factory `bench engine --model … --decoder vae|taehv|preview` measures, random
    weights at the family's real widths (None: no decode, or no --model)."""
    if getattr(args, "model", None) is None or args.decoder == "none":
        return None
    from ..bundles.bundle import resolve_dtype
    from ..bundles.real import random_decoder

    device = getattr(args, "device", "cpu")
    return random_decoder(load_family_config(args.model), args.decoder, device, dtype=resolve_dtype(args.dtype, device))
