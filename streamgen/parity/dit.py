"""Runner for the dit fixture: full-sequence pass (with intermediates), KV-cache path chunk by chunk,
and checkpoint loading — run once per weight file, so the envelope choice is checked end to end."""
from __future__ import annotations


import torch
from torch import Tensor

from ..cache.kv import CallSpec
from ..cache.policy import make_policy
from ..models.attention import BlockCausalAttention
from ..models.dit import WanDiT
from ..sampling.denoiser import Denoiser
from .common import Fixture, Report, end_index


def full_pass(model: WanDiT, t: dict[str, Tensor], frames_per_block: int) -> dict[str, Tensor]:
    """out_full plus the intermediates the fixture stores, captured with forward hooks."""
    b, _, f = t["x"].shape[:3]
    out: dict[str, Tensor] = {}
    hooks = [
        model.patch_embedding.register_forward_hook(lambda m, i, o: out.__setitem__("full.patch_embed", o.flatten(2).transpose(1, 2))),
        model.time_embedding.register_forward_hook(lambda m, i, o: out.__setitem__("full.time_e", o.unflatten(0, (b, f)))),
        model.time_projection.register_forward_hook(lambda m, i, o: out.__setitem__("full.time_e0", o.unflatten(1, (6, -1)).unflatten(0, (b, f)))),
        model.text_embedding.register_forward_hook(lambda m, i, o: out.__setitem__("full.context_emb", o)),
        model.head.head.register_forward_hook(lambda m, i, o: out.__setitem__("full.head_out", o)),
    ]
    hooks += [blk.register_forward_hook(lambda m, i, o: out.__setitem__(f"full.block_out.{m.index}", o)) for blk in model.blocks]
    with torch.no_grad():
        out["out_full"] = model(t["x"], t["t"], model.cross_kv(t["context"]), BlockCausalAttention(model.rope, frames_per_block))
    for h in hooks:
        h.remove()
    return out


def kv_path(fx: Fixture, model: WanDiT) -> dict[str, Tensor]:
    """Chunk-by-chunk calls through the full-cache policy: outputs, self- and cross-attention caches."""
    t, chunk = fx.tensors, int(fx.config["num_frame_per_block"])
    policy = make_policy("full", capacity_frames=fx.frames("kv_cache_capacity_tokens"))
    x, ts = t["x"].transpose(1, 2), t["t"]
    cache = policy.allocate(model.cfg.num_layers, x.shape[0], fx.tokens_per_frame, model.cfg.num_heads, model.cfg.head_dim)
    cross = model.cross_kv(t["context"])
    denoiser = Denoiser(model, policy)
    out: dict[str, Tensor] = {}
    for j in range(x.shape[1] // chunk):
        frames = slice(j * chunk, (j + 1) * chunk)
        flow = denoiser.one(x[:, frames], ts[:, frames], cross, cache, CallSpec(j * chunk, chunk))
        out[f"out_kv_chunk{j}"] = flow.transpose(1, 2)
    filled = cache.tokens(0, cache.local_end)
    for i in range(model.cfg.num_layers):
        out[f"kv_cache.{i}.k"], out[f"kv_cache.{i}.v"] = cache.k[i][:, filled], cache.v[i][:, filled]
        out[f"crossattn_cache.{i}.k"], out[f"crossattn_cache.{i}.v"] = cross[i]
    out["kv_cache_end_index"] = end_index(cache.end_index())
    return out


def run(fx: Fixture, report: Report) -> None:
    reference = fx.build_model(fx.path / "weights.safetensors")
    for weights in sorted(p for p in fx.path.iterdir() if p.suffix in (".safetensors", ".pt") and p.stem != "tensors"):
        model = reference if weights.name == "weights.safetensors" else fx.build_model(weights)
        produced = {**full_pass(model, fx.tensors, int(fx.config["num_frame_per_block"])), **kv_path(fx, model)}
        for name in sorted(produced):
            if name in fx.tensors:
                report.compare(f"[{weights.name}] {name}", produced[name], fx.tensors[name])
        if model is not reference:  # the envelope choice: must reproduce weights.safetensors exactly
            loaded, expected = model.state_dict(), reference.state_dict()
            worst = max((loaded[k] - v).abs().max().item() for k, v in expected.items())
            report.rows.append((f"[{weights.name}] loaded weights vs weights.safetensors", worst, worst == 0.0))
