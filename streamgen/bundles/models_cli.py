"""`streamgen models list | show NAME | check DIR [--family NAME]`: the families and what a dir holds."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .family import CONFIG_ENV, DECODERS, FamilySpec, load_all, load_family_config


def _policy_text(spec: FamilySpec) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in spec.stream.policy_settings.items())
    return f"{spec.stream.policy}({settings})"


def render_list(specs: list[FamilySpec]) -> str:
    rows = [("NAME", "KIND", "SAMPLER", "STEPS", "SHIFT", "DIT CHECKPOINT", "POLICY")]
    for s in specs:
        steps = f"{len(s.stream.steps)} {'warped' if s.stream.warp_steps else 'raw'}"
        rows.append((s.name, s.kind, s.stream.sampler, steps, f"{s.stream.shift:g}",
                     f"{s.files.dit.path[0]} [{s.files.dit.envelope_text}]" + (" + lora" if s.files.lora else ""),
                     _policy_text(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
        f"  policy:       {_policy_text(spec)}",
        f"  sampler:      {s.sampler}, schedule {s.schedule}, chunk {s.chunk_frames} frames, context_noise {s.context_noise:g}",
        f"  steps:        {[int(x) if x == int(x) else x for x in s.steps]} {'warped' if s.warp_steps else 'raw'}, "
        f"shift {s.shift:g} -> fed timesteps {[round(t, 4) for t in spec.fed_timesteps()]}",
        f"  transition:   {s.transition.kind}"
        + (f" over {s.transition.chunks} chunk(s)" if s.transition.kind == "blend" else ""),
        f"  KV cache:     {kv_frame / 2**20:.1f} MiB per latent frame (bf16)"
        + (f", {cap} frames = {cap * kv_frame / 2**30:.2f} GiB" if isinstance(cap, int) else ""),
        "  files (relative to the model dir):",
    ]
    for role, fs, required in spec.file_specs(decoder=None):
        extra = ""
        if role == "dit":
            extra = f" [envelope {fs.envelope_text}]"
        elif role == "lora":
            extra = f" [{fs.key}, rank {fs.rank}, alpha {fs.alpha:g}, {len(fs.target_modules)} modules per block]"
        lines.append(f"    {role:<12} {fs.shown}{extra}{'' if required else ' (optional)'}"
                     + (f"  <- {fs.source}" if fs.source else ""))
    return "\n".join(line for line in lines if line)


def cmd_models_list(args: argparse.Namespace) -> int:
    specs, errors = load_all(args.configs)
    print(render_list(specs))
    for err in errors:
        print(err, file=sys.stderr)
    return 1 if errors else 0


def cmd_models_show(args: argparse.Namespace) -> int:
    print(render_show(load_family_config(args.name, args.configs)))
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
    models = subparsers.add_parser("models", help="model families: list, show, check a local model dir")
    models.add_argument("--configs", type=Path, default=None,
                        help=f"folder of family YAMLs (default: ${CONFIG_ENV}/models or the package's configs/models)")
    sub = models.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="every family with its cache policy, sampler and steps")
    ls.set_defaults(func=cmd_models_list)
    show = sub.add_parser("show", help="one family's architecture, stream settings and files")
    show.add_argument("name", help="family name or path of a family YAML")
    show.set_defaults(func=cmd_models_show)
    check = sub.add_parser("check", help="validate a local model dir (files, keys, shapes; reads headers only)")
    check.add_argument("dir", type=Path)
    check.add_argument("--family", help="family name or YAML path (default: try every family)")
    check.add_argument("--decoder", choices=DECODERS, default="vae", help="decoder whose file is required (default vae)")
    check.set_defaults(func=cmd_models_check)
    return models
