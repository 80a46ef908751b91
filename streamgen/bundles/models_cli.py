"""`streamgen models list | show NAME | check DIR [--family NAME]`: the built-in models, the families and
what a dir holds."""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .builtins import BUILTINS, DEFAULT_MODEL, BuiltinModel
from .family import CONFIG_ENV, DECODERS, FamilyConfigError, FamilySpec, load_all, load_family_config, lora_targets

if TYPE_CHECKING:  # torch: only when a built-in model is listed or shown
    from .bundle import ModelBundle


def _policy_text(stream: Any) -> str:
    """`policy(settings)` of a family's `StreamSpec` or a bundle's `StreamConfig` (the same fields)."""
    settings = ", ".join(f"{k}={v}" for k, v in stream.policy_settings.items())
    return f"{stream.policy}({settings})"


def _steps_text(stream: Any) -> str:
    return f"{len(stream.steps)} {'warped' if stream.warp_steps else 'raw'}"


def _stream_lines(stream: Any, after_shift: str = "") -> list[str]:
    """The policy, sampler, steps and transition lines of `models show`, for a family or a built-in model."""
    s = stream
    blend = f" over {s.transition.chunks} chunk(s)" if s.transition.kind == "blend" else ""
    return [f"  policy:       {_policy_text(s)}",
            f"  sampler:      {s.sampler}, schedule {s.schedule}, chunk {s.chunk_frames} frames, "
            f"context_noise {s.context_noise:g}",
            f"  steps:        {[int(x) if x == int(x) else x for x in s.steps]} {'warped' if s.warp_steps else 'raw'}, "
            f"shift {s.shift:g}{after_shift}",
            f"  transition:   {s.transition.kind}{blend}"]


def render_list(specs: list[FamilySpec], builtins: Iterable[BuiltinModel] = ()) -> str:
    rows = [("NAME", "KIND", "SAMPLER", "STEPS", "SHIFT", "DIT CHECKPOINT", "POLICY")]
    for b in builtins:
        rows.append((b.name, "built-in", b.stream.sampler, _steps_text(b.stream), f"{b.stream.shift:g}",
                     "(in the package: no --model-dir)", _policy_text(b.stream)))
    for s in specs:
        rows.append((s.name, s.kind, s.stream.sampler, _steps_text(s.stream), f"{s.stream.shift:g}",
                     f"{s.files.dit.path[0]} [{s.files.dit.envelope_text}]" + (" + lora" if s.files.lora else ""),
                     _policy_text(s.stream)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render_show_builtin(bundle: ModelBundle, default: bool = False) -> str:
    """A built-in model as `render_show` shows a family: what it is, its DiT, frames, stream settings."""
    import torch

    cfg, s = bundle.dit.cfg, bundle.stream
    latent = torch.zeros(1, 1, cfg.in_dim, s.latent_height, s.latent_width)
    height, width = bundle.decoder().push(latent).shape[2:4]  # what the decoder really makes of a latent frame
    tokens = (s.latent_height // cfg.patch_size[1]) * (s.latent_width // cfg.patch_size[2])
    params = sum(p.numel() for p in bundle.dit.parameters())
    return "\n".join([
        f"{bundle.name}: built-in model{' (the default)' if default else ''}, in the package: no --model-dir",
        f"  {bundle.description}",
        f"  architecture: dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads x {cfg.head_dim}, {cfg.num_layers} "
        f"layers, text {cfg.text_len}x{cfg.text_dim}, patch {tuple(cfg.patch_size)}: {params:,} DiT params",
        f"  video:        {width}x{height} (WxH) at {bundle.fps:g} fps <- latent {s.latent_height}x{s.latent_width} "
        f"(HxW), {tokens} tokens per latent frame",
        f"  parts:        text encoder {type(bundle.text_encoder).__name__}, decoder {type(bundle.decoder()).__name__}",
        *_stream_lines(s),
        f"  try:          streamgen serve --model {bundle.name}   (first prompt: {bundle.example_prompt!r})",
    ])


def render_show(spec: FamilySpec) -> str:
    a, v, s = spec.architecture, spec.video, spec.stream
    cfg = spec.dit_config()
    from .check import expected_dit_shapes  # torch: only when a family is shown

    shapes = expected_dit_shapes(cfg)
    params = sum(math.prod(x) for x in shapes.values())
    tokens = (v.latent_height // a.patch_size[1]) * (v.latent_width // a.patch_size[2])
    kv_frame = tokens * a.num_layers * 2 * a.dim * 2  # K+V, bf16
    cap = s.policy_settings.get("capacity_frames")
    lines = [
        f"{spec.name}: {spec.title} ({spec.kind})",
        f"  {spec.description}",
        f"  config:       {spec.path}" if spec.path else "",
        f"  reference:    {spec.reference}" if spec.reference else "",
        f"  architecture: dim {a.dim}, ffn {a.ffn_dim}, {a.num_heads} heads x {cfg.head_dim}, {a.num_layers} layers, "
        f"text {a.text_len}x{a.text_dim}, patch {tuple(a.patch_size)}: {len(shapes)} keys, {params:,} params",
        f"  video:        {v.width}x{v.height} (WxH) at {v.fps:g} fps -> latent {v.latent_height}x{v.latent_width} (HxW), "
        f"{tokens} tokens per latent frame",
        *_stream_lines(s, f" -> fed timesteps {[round(t, 4) for t in spec.fed_timesteps()]}"),
        f"  KV cache:     {kv_frame / 2**20:.1f} MiB per latent frame (bf16)"
        + (f", {cap} frames = {cap * kv_frame / 2**30:.2f} GiB" if isinstance(cap, int) else ""),
        "  files (relative to the model dir):",
    ]
    for role, fs, required in spec.file_specs(decoder=None):
        extra = ""
        if role == "dit":
            extra = f" [envelope {fs.envelope_text}]"
        elif role == "lora":
            where = ("per block" if fs.match == "block" else
                     f"by PEFT's suffix rule ({len(lora_targets(cfg, fs.target_modules, match='suffix'))} modules)")
            extra = (f" [{fs.key or 'bare adapter'}, rank {fs.rank}, alpha {fs.alpha:g} (scale {fs.scale:g}), "
                     f"{len(fs.target_modules)} module names {where}]")
        lines.append(f"    {role:<12} {fs.shown}{extra}{'' if required else ' (optional)'}"
                     + (f"  <- {fs.source}" if fs.source else ""))
    return "\n".join(line for line in lines if line)


def cmd_models_list(args: argparse.Namespace) -> int:
    specs, errors = load_all(args.configs, build_checks=False)  # `models show NAME` runs every check
    print(render_list(specs, BUILTINS.values()))
    print(f"built-in models run as they are (default: {DEFAULT_MODEL}); a family needs --model-dir DIR with its "
          "files (`streamgen models show NAME`)")
    for err in errors:
        print(err, file=sys.stderr)
    return 1 if errors else 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from .bundle import BUNDLES

    if args.name in BUNDLES:  # as `load_bundle` resolves a name: built-ins first
        print(render_show_builtin(BUNDLES[args.name](), default=args.name == DEFAULT_MODEL))
        return 0
    try:
        spec = load_family_config(args.name, args.configs)
    except FamilyConfigError as exc:
        raise FamilyConfigError(f"{exc}; built-in models: {', '.join(BUNDLES)}") from None
    print(render_show(spec))
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    from .check import LazyFiles, check_model_dir

    reader = LazyFiles()
    if args.family:
        report = check_model_dir(load_family_config(args.family, args.configs), args.dir, args.decoder, reader)
        print(report.render())
        return 0 if report.ok else 1
    specs, errors = load_all(args.configs)
    for err in errors:
        print(err, file=sys.stderr)
    usable = []
    for spec in specs:
        report = check_model_dir(spec, args.dir, args.decoder, reader)
        dit = report.file("dit")
        if dit is not None and dit.path is None:
            print(f"--   {spec.name}: not here (no {spec.files.dit.shown})")
            continue
        print(report.render())
        if report.ok:
            usable.append(spec.name)
    print(f"usable families in {args.dir}: {', '.join(usable) if usable else 'none'}")
    return 0 if usable else 1


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `streamgen models list | show NAME | check DIR [--family NAME] [--decoder vae|taehv]`."""
    models = subparsers.add_parser("models", help="built-in models and model families: list, show, check a local model dir")
    models.add_argument("--configs", type=Path, default=None,
                        help=f"folder of family YAMLs (default: ${CONFIG_ENV}/models or the package's configs/models)")
    sub = models.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="every built-in model and family with its cache policy, sampler and steps")
    ls.set_defaults(func=cmd_models_list)
    show = sub.add_parser("show", help="one built-in model's or family's architecture, stream settings and files")
    show.add_argument("name", help="built-in model, family name or path of a family YAML")
    show.set_defaults(func=cmd_models_show)
    check = sub.add_parser("check", help="validate a local model dir (files, keys, shapes; reads headers only)")
    check.add_argument("dir", type=Path)
    check.add_argument("--family", help="family name or YAML path (default: try every family)")
    check.add_argument("--decoder", choices=DECODERS, default="vae", help="decoder whose file is required (default vae)")
    check.set_defaults(func=cmd_models_check)
    return models
