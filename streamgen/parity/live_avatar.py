"""Runner for the live_avatar fixture: LiveAvatar's causal S2V streaming loop (meta.json: semantics),
both sink variants, every call's input and flow, caches, audio tokens and per-block debug tensors.

Clips, blocks, steps, sizes, injector positions and the rolling-sink draws all come from meta.json and
the tensors. Besides allclose (max |Δ|) every output gets a relative-L2 row (per block for the per-call
tensors) gated by `rtol`, the criterion the fixture README recommends (values have std ≈ 1.6).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from ..models.checkpoint import load_dit_weights
from ..models.s2v import S2VConfig, S2VDiT
from ..sampling.s2v_blocks import EulerSchedule, RecordedSinkDraws, S2VBlockSampler
from .common import Fixture, Report


def build_model(fx: Fixture) -> S2VDiT:
    """The fixture's tiny S2V model: config.model plus the pipeline-level sizes the model also needs."""
    cfg = fx.config
    model_cfg = S2VConfig.from_dict({**cfg["model"], "audio_layers": cfg["n_wav2vec_layers"],
                                     "motion_frames": cfg["audio_pad_frames"], "ref_rope_frame": cfg["ref_rope_frame"],
                                     "rope_max_frames": cfg["rope_table_rows"], "rope_theta": cfg["rope_theta"]})
    model = S2VDiT(model_cfg).eval()
    model.load_state_dict(load_dit_weights(fx.weights_path(), model.expected_shapes()), strict=True)
    return model


def variants(fx: Fixture) -> dict[str, set[int]]:
    """{variant prefix: clips at which the sink reference is replaced}, from the tensor names."""
    found: dict[str, set[int]] = {}
    for name in fx.tensors:
        if m := re.match(r"(\w+)\.final_latents$", name):
            found.setdefault(m[1], set())
    for name in fx.tensors:
        if m := re.match(r"(\w+)\.sink_latent_clip(\d+)$", name):
            found[m[1]].add(int(m[2]))
    return found


def debug_observer(out: dict[str, Tensor], prefix: str) -> Callable[[str, Tensor], None]:
    """Stores the model's intermediate tokens of one call under the fixture's debug names."""
    return lambda name, tokens: out.__setitem__(f"{prefix}.{name}", tokens.clone())


def run_variant(fx: Fixture, model: S2VDiT, variant: str, swaps: set[int]) -> dict[str, Tensor]:
    """The streaming loop of meta.json: semantics for one variant, outputs under the fixture's names. The block
    loop and its caches are `S2VBlockSampler`'s (the audio-driven stream runs the same one)."""
    cfg, t = fx.config, fx.tensors
    m = model.cfg
    schedule = EulerSchedule(t["sched.timesteps"], t["sched.sigmas"])
    steps, chunk = schedule.steps, int(cfg["num_frames_per_block"])
    blocks, afpb = int(cfg["blocks_per_clip"]), int(cfg["audio_frames_per_block"])
    draws = RecordedSinkDraws(t["rope_rd_draws"].tolist(), steps)
    traced = {(int(a), int(b)) for a, b in (re.match(rf"{variant}\.debug\.blk(\d+)\.step(\d+)\.", n).groups()
                                           for n in t if n.startswith(f"{variant}.debug."))}
    cross = model.cross_kv(model.context(t["context"][None]))
    sampler = S2VBlockSampler(model, schedule, ring_tokens=int(cfg["ring_cache_tokens"]),
                              cond_tokens=int(cfg["cond_cache_capacity_tokens"]), chunk_frames=chunk,
                              batch=int(cfg["batch"]))
    cond = sampler.cond
    ref, motion = t["ref_latents"], t["motion_latents"]
    out: dict[str, Tensor] = {}
    xs, flows, finals, audio_tokens, audio_global = [], [], [], [], []

    def record(_step: int, x: Tensor, flow: Tensor) -> None:
        xs[-1].append(x[0])
        flows[-1].append(flow[0])

    for r in range(int(cfg["n_clips"])):
        if r == 0 or r in swaps:
            if r in swaps:  # the first generated latent frame becomes the sink reference
                ref = finals[0][:, :, :1].clone()
                out[f"sink_latent_clip{r}"] = ref
            sampler.prefill(ref, motion, cross)
            for i in range(m.num_layers):
                out[f"cond_cache.after_prefill_clip{r}.layer{i}.k"] = cond.k[i][:, :cond.end].clone()
                out[f"cond_cache.after_prefill_clip{r}.layer{i}.v"] = cond.v[i][:, :cond.end].clone()
        for b in range(blocks):
            g = r * blocks + b
            x = t["noise"][r][None, :, chunk * b:chunk * (b + 1)]
            pose = t["cond_latents"][:, :, chunk * b:chunk * (b + 1)]
            audio = model.casual_audio_encoder(t["audio_emb"][..., afpb * g:afpb * (g + 1)])
            audio_tokens.append(audio.tokens)
            audio_global.append(audio.global_)
            xs.append([])
            flows.append([])

            def observe(i: int, g: int = g):
                return debug_observer(out, f"debug.blk{g}.step{i}") if (g, i) in traced else None

            finals.append(sampler.block(x, g, pose, audio, cross, [draws(g, i) for i in range(steps)], record, observe))
    out["final_latents"] = torch.cat(finals, dim=2)[0]
    out["step_x"] = torch.stack([torch.stack(s) for s in xs])
    out["step_flow"] = torch.stack([torch.stack(s) for s in flows])
    for i, ring in enumerate(sampler.rings):
        for layer in range(m.num_layers):
            out[f"kv_cache.step{i}.layer{layer}.k"], out[f"kv_cache.step{i}.layer{layer}.v"] = ring.k[layer], ring.v[layer]
    produced = {f"{variant}.{k}": v for k, v in out.items()}
    produced["audio.merged_audio_emb"] = torch.stack(audio_tokens)
    produced["audio.audio_emb_global"] = torch.stack(audio_global)
    return produced


def relative_l2(actual: Tensor, expected: Tensor) -> float:
    """||a − e|| / ||e||; per-call tensors [blocks, ...] give their worst block."""
    diff = (actual.to(expected.dtype) - expected).flatten(1).norm(dim=1)
    return (diff / expected.flatten(1).norm(dim=1).clamp_min(1e-30)).max().item()


def run(fx: Fixture, report: Report) -> None:
    """Every variant; tensors shared by the variants (audio) are compared once."""
    model = build_model(fx)
    produced: dict[str, Tensor] = {}
    with torch.no_grad():
        for variant, swaps in variants(fx).items():
            produced.update({k: v for k, v in run_variant(fx, model, variant, swaps).items() if k not in produced})
    for name in sorted(produced):
        if name in fx.tensors:
            actual, expected = produced[name], fx.tensors[name]
            report.compare(name, actual, expected)
            if actual.shape == expected.shape:
                per_block = name.endswith(("step_x", "step_flow"))
                value = relative_l2(actual if per_block else actual[None], expected if per_block else expected[None])
                report.rows.append((f"{name} (relative L2{', worst block' if per_block else ''})", value, value <= report.rtol))
