"""Runner for the chunk-wise few-step fixtures: self_forcing, longlive (+ prompt re-cache),
reward_forcing (every alpha variant) and deep_forcing. Every size and switch point comes from meta.json."""
from __future__ import annotations

import torch
from torch import Tensor

from ..cache.kv import CallSpec, KVCache
from ..cache.policy import CachePolicy, make_policy
from ..models.dit import WanDiT
from ..sampling.denoiser import Denoiser
from ..sampling.few_step import FewStepSampler
from ..sampling.schedule import FlowSchedule
from .common import Fixture, Report, end_index


def policy_for(fx: Fixture, variant: str) -> CachePolicy:
    """The cache policy a fixture's reference used, from its config."""
    cfg = fx.config
    window = int(cfg.get("local_attn_size", -1))
    sink = int(cfg.get("sink_size", 0))
    if fx.kind == "reward_forcing":
        return make_policy("ema_sink", capacity_frames=window, sink_frames=sink, alpha=float(variant))
    if fx.kind == "deep_forcing":
        if cfg.get("participative_compression"):
            raise NotImplementedError("deep_forcing fixtures with participative compression are not covered")
        return make_policy("deep_sink", capacity_frames=window, sink_frames=sink)
    if window == -1:
        return make_policy("full", capacity_frames=fx.frames("kv_cache_capacity_tokens"))
    return make_policy("window_sink", capacity_frames=window, sink_frames=sink, global_sink=bool(cfg.get("global_sink", True)))


def variants(fx: Fixture) -> list[str]:
    """Reward Forcing stores one run per alpha under the prefix `alpha<value>.`; others have one run."""
    return [str(a) for a in fx.config.get("compression_alpha_variants", [])] or [""]


def cache_snapshot(cache: KVCache, layers: range, prefix: str, kind: str, sink_frames: int) -> dict[str, Tensor]:
    """Cache tensors under the fixture's names; both full buffers and filled parts are offered."""
    out: dict[str, Tensor] = {}
    filled = cache.tokens(0, cache.local_end)
    for i in layers:
        for name, buf in (("k", cache.k[i]), ("v", cache.v[i])):
            out[f"{prefix}.layer{i}.{name}"] = buf if kind != "self_forcing" else buf[:, filled]
            out[f"{prefix}.layer{i}.sink_{name}"] = buf[:, cache.tokens(0, sink_frames)]
    sink_start = cache.state.get("sink_start_frame")
    out[f"{prefix}.end_index"] = end_index(cache.end_index())
    out[f"{prefix}.state"] = end_index(cache.end_index() + [-1 if sink_start is None else sink_start])
    return {k: v.clone() for k, v in out.items()}


def run_variant(fx: Fixture, model: WanDiT, variant: str) -> dict[str, Tensor]:
    cfg, t = fx.config, fx.tensors
    pre = f"alpha{variant}." if variant else ""
    policy = policy_for(fx, variant)
    schedule = FlowSchedule(float(cfg["timestep_shift"]))
    steps = schedule.step_list(cfg["denoising_step_list"], warp=bool(cfg.get("warp_denoising_step", True)))
    sampler = FewStepSampler(schedule, steps, context_noise=float(cfg.get("context_noise", 0)))
    denoiser = Denoiser(model, policy)
    noise = t["noise"]
    b, total = noise.shape[:2]
    chunk = int(cfg["num_frame_per_block"])
    contexts = [t[k] for k in sorted(t) if k.startswith("context")]
    cache = policy.allocate(model.cfg.num_layers, b, fx.tokens_per_frame, model.cfg.num_heads, model.cfg.head_dim)
    prompt = 0
    cross = model.cross_kv(contexts[0])
    switches = list(cfg.get("switch_frame_indices", []))
    out: dict[str, Tensor] = {}
    latents: list[Tensor] = []
    steps_x0: list[list[Tensor]] = []
    layers = range(model.cfg.num_layers)
    for j in range(total // chunk):
        start = j * chunk
        if switches and start >= switches[0]:
            switches.pop(0)
            prompt += 1
            cross = model.cross_kv(contexts[prompt])
            recent = torch.cat(latents, dim=1)
            n = min(policy.capacity_frames, start)
            policy.prepare_recache(cache)
            x = recent[:, start - n:start]
            flow = denoiser.one(x, torch.full((b, n), sampler.context_noise), cross, cache, CallSpec(start - n, n, "recache"))
            out.update({"recache.input": x, "recache.flow": flow})
            out.update(cache_snapshot(cache, layers, "recache.cache_after", fx.kind, policy_sink(policy)))
        x0s: list[Tensor] = []
        fresh = lambda k, j=j: t["renoise"][j * (len(steps) - 1) + k].reshape(b, chunk, *noise.shape[2:])  # noqa: E731
        x0 = sampler.sample(lambda x, tt, call: denoiser.one(x, tt, cross, cache, call), noise[:, start:start + chunk],
                            start, fresh, observe=lambda k, x, v, x0: x0s.append(x0))
        latents.append(x0)
        steps_x0.append(x0s)
        out.update(cache_snapshot(cache, layers, f"cache_after_chunk.{j}", fx.kind, policy_sink(policy)))
    out.update(cache_snapshot(cache, layers, "final_cache", fx.kind, policy_sink(policy)))
    out["final_latents"] = torch.cat(latents, dim=1)
    out["step_x0"] = torch.stack([torch.stack(s) for s in steps_x0])
    out["denoising_timesteps"] = torch.tensor(steps, dtype=torch.float32)
    return {pre + k: v for k, v in out.items()}


def policy_sink(policy: CachePolicy) -> int:
    return int(getattr(policy, "sink_frames", 0))


def run(fx: Fixture, report: Report) -> None:
    model = fx.build_model()
    for variant in variants(fx):
        report.compare_all(run_variant(fx, model, variant), fx.tensors)
