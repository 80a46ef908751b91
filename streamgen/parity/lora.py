"""Runner for the longlive_lora fixture: LongLive's adapter merged into the base weights, at the
configured alpha and at the half-alpha variant, checked by weights and by one KV-cache call."""
from __future__ import annotations

import torch

from ..cache.kv import CallSpec
from ..cache.policy import make_policy
from ..models.checkpoint import load_lora, merge_lora, read_tensors
from ..models.dit import WanDiT
from ..sampling.denoiser import Denoiser
from .common import Fixture, Report


def first_call(fx: Fixture, model: WanDiT) -> torch.Tensor:
    """The first denoising call of chunk 0 (empty caches), channels-first like the fixture."""
    cfg, t = fx.config, fx.tensors
    policy = make_policy("window_sink", capacity_frames=int(cfg["local_attn_size"]), sink_frames=int(cfg["sink_size"]))
    x = t["x"].transpose(1, 2)
    cache = policy.allocate(model.cfg.num_layers, x.shape[0], fx.tokens_per_frame, model.cfg.num_heads, model.cfg.head_dim)
    flow = Denoiser(model, policy).one(x, t["t"], model.cross_kv(t["context"]), cache,
                                       CallSpec(int(cfg.get("current_start", 0)) // fx.tokens_per_frame, x.shape[1]))
    return flow.transpose(1, 2)


def run(fx: Fixture, report: Report) -> None:
    cfg = fx.config
    base = fx.build_model()
    lora = load_lora(fx.path / "lora.pt")
    report.compare("out_base", first_call(fx, base), fx.tensors["out_base"])
    variants = {"out_lora": cfg["adapter"].get("alpha"), "out_lora_alpha_half": cfg["alpha_half_variant"]["alpha"]}
    for name, alpha in variants.items():
        merged = merge_lora(base.state_dict(), lora, alpha=alpha)
        model = WanDiT(base.cfg).eval()
        model.load_state_dict(merged)
        report.compare(name, first_call(fx, model), fx.tensors[name])
        if name == "out_lora":
            expected = read_tensors(fx.path / "merged_weights.safetensors")
            worst = max(expected, key=lambda k: (merged[k] - expected[k]).abs().max().item())
            report.compare(f"merged weights (worst key {worst})", merged[worst], expected[worst])
    report.compare("out_merged", first_call(fx, fx.build_model(fx.path / "merged_weights.safetensors")), fx.tensors["out_merged"])
