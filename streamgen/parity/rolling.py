"""Runner for the rolling_forcing fixture: every window's input, timesteps and x̂0, the cache."""
from __future__ import annotations

import torch
from torch import Tensor

from ..cache.policy import make_policy
from ..sampling.denoiser import Denoiser
from ..sampling.rolling import RollingSampler
from ..sampling.schedule import FlowSchedule
from .chunked import cache_snapshot
from .common import Fixture, Report


def run(fx: Fixture, report: Report) -> None:
    cfg, t = fx.config, fx.tensors
    model = fx.build_model()
    blk = int(cfg["num_frame_per_block"])
    policy = make_policy("rolling_anchor", capacity_frames=fx.frames("kv_cache_capacity_tokens"),
                         attention_frames=fx.frames("max_attention_size_tokens"), block_frames=blk)
    schedule = FlowSchedule(float(cfg["timestep_shift"]))
    steps = schedule.step_list(cfg["denoising_step_list"], warp=bool(cfg.get("warp_denoising_step", True)))
    sampler = RollingSampler(schedule, steps, blk, int(cfg["rolling_window_blocks"]), float(cfg.get("context_noise", 0)))
    noise = t["noise"]
    b = noise.shape[0]
    num_blocks = int(cfg["num_blocks"])
    cache = policy.allocate(model.cfg.num_layers, b, fx.tokens_per_frame, model.cfg.num_heads, model.cfg.head_dim)
    cross = model.cross_kv(t["context"])
    denoiser = Denoiser(model, policy)
    order = iter(range(len(t["renoise"])))
    drawn: list[list[int]] = []

    def fresh(w: int, block: int, level: int) -> Tensor:
        i = next(order)
        drawn.append([w, block, level])
        return t["renoise"][i].reshape(b, blk, *noise.shape[2:])

    out: dict[str, Tensor] = {}
    latents: dict[int, Tensor] = {}
    noisy: dict[int, Tensor] = {}

    def observe(w: int, x: Tensor, tt: Tensor, x0: Tensor) -> None:
        out.update({f"window.{w}.input": x, f"window.{w}.t": tt.clone(), f"window.{w}.x0": x0})

    layers = range(model.cfg.num_layers)
    for w in range(int(cfg["num_windows"])):
        latents.update(sampler.window(lambda x, tt, call: denoiser.one(x, tt, cross, cache, call), w, noisy,
                                      lambda blk_i: noise[:, blk_i * blk:(blk_i + 1) * blk], fresh, num_blocks, observe))
        out[f"window.{w}.cache_end_index"] = torch.tensor(cache.end_index())
        out.update(cache_snapshot(cache, layers, f"cache_after_window.{w}", "", 0))
    out.update(cache_snapshot(cache, layers, "final_cache", "", 0))
    out["final_latents"] = torch.cat([latents[i] for i in range(num_blocks)], dim=1)
    out["renoise_index"] = torch.tensor(drawn, dtype=torch.int64)
    out["denoising_timesteps"] = torch.tensor(steps, dtype=torch.float32)
    report.compare_all(out, t)
