"""`streamgen train`: train the embedded model on the procedural world (docs/embedded_model.md).

Wire it in streamgen/cli.py with `add_train_parser(sub)`; it sets `func` to `cmd_train`.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields
from pathlib import Path


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` sub-command to an argparse subparsers object."""
    from .config import DEFAULTS as d  # torch-free: the parser costs nothing until `train` runs
    from .config import LEAD_IN_MOTIONS, TASKS

    with_default = " (default: %(default)s)"  # appended to every help whose flag has a default

    p = subparsers.add_parser("train", help="train the embedded model (DeepSpeed; CPU by default)",
                              description="Phase 1: Diffusion Forcing on world clips. Phase 2: self-forcing rollouts "
                                          "with the world as teacher. Exports the EMA weights to OUT/embedded.safetensors.")
    p.add_argument("--model", dest="task", choices=TASKS, default=d.task,
                   help="what to train: the embedded text model, or the embedded avatar on the avatar world "
                        "(docs/embedded_avatar.md)" + with_default)
    p.add_argument("--out", default=d.out, help="run folder: checkpoints, log.jsonl, weights, eval (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data, noise and initial weights" + with_default)
    p.add_argument("--until", type=int, metavar="STEP",
                   help="stop at this step of the schedule (checkpoint, export and eval there); the schedule "
                        "(warm-up, cosine) still spans --phase1-steps + --phase2-steps")
    g = p.add_argument_group("schedule")
    g.add_argument("--phase1-steps", type=int, default=d.phase1_steps,
                   help="Diffusion Forcing steps on world clips" + with_default)
    g.add_argument("--phase2-steps", type=int, default=d.phase2_steps,
                   help="self-forcing steps on the model's own rollouts" + with_default)
    g.add_argument("--batch", type=int, default=d.batch, help="phase-1 clips per step" + with_default)
    g.add_argument("--p2-batch", type=int, default=d.p2_batch, help="rollouts per phase-2 step" + with_default)
    g.add_argument("--p2-max-rollout", type=int, default=d.p2_max_rollout,
                   help="most context chunks generated before the target" + with_default)
    g.add_argument("--p2-switch-prob", type=float, default=d.p2_switch_prob,
                   help="phase-2 steps whose rollout switches prompt at a chunk boundary" + with_default)
    g.add_argument("--p2-own-prob", type=float, default=d.p2_own_prob,
                   help="phase-2 targets denoised from the sampler's own step input instead of fresh noise" + with_default)
    g.add_argument("--p2-mix", type=float, default=d.p2_mix, help="share of phase-2 steps run as phase-1 steps" + with_default)
    g.add_argument("--switch-prob", type=float, default=d.switch_prob,
                   help="phase-1 clips with a prompt switch at a chunk boundary" + with_default)
    g.add_argument("--df-prob", type=float, default=d.df_prob,
                   help="phase-1 clips with every chunk noisy (else a clean prefix of 1-2 chunks)" + with_default)
    g.add_argument("--sampler-step-prob", type=float, default=d.sampler_step_prob,
                   help="noise levels drawn from the sampler's own timesteps instead of the whole table" + with_default)
    g.add_argument("--lead-in-prob", type=float, default=d.lead_in_prob,
                   help="phase-1 clips whose first 1–2 chunks hold still or move another way than the prompt "
                        "(teaches: move as the prompt says, whatever the context did)" + with_default)
    g.add_argument("--lead-in-motion", choices=LEAD_IN_MOTIONS, default=d.lead_in_motion,
                   help="lead-ins move another way or hold still (any), or only hold still" + with_default)
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)" + with_default)
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="the cosine schedule's final learning rate, as a share of --lr" + with_default)
    o.add_argument("--warmup", type=int, default=d.warmup, help="linear learning-rate warm-up steps" + with_default)
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay" + with_default)
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip" + with_default)
    o.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="decay of the EMA weights that are exported and evaluated" + with_default)
    m = p.add_argument_group("model")
    m.add_argument("--dim", type=int, help="DiT width (default: the embedded model's, 128)")
    m.add_argument("--layers", type=int, help="DiT blocks (default 4)")
    m.add_argument("--heads", type=int, help="attention heads (default 4)")
    m.add_argument("--ffn-dim", type=int, help="FFN width (default 512)")
    r = p.add_argument_group("run")
    r.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint every N steps" + with_default)
    r.add_argument("--keep-ckpts", type=int, default=d.keep_ckpts, help="checkpoints kept (older ones deleted)" + with_default)
    r.add_argument("--log-every", type=int, default=d.log_every, help="a line in OUT/log.jsonl every N steps" + with_default)
    r.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="checker eval of the EMA weights every N steps (0: only at the end)" + with_default)
    r.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="streams in each eval (0: no final eval)" + with_default)
    r.add_argument("--eval-frames", type=int, default=d.eval_frames, help="frames per eval stream" + with_default)
    r.add_argument("--threads", type=int, default=d.threads, help="torch threads in the training process" + with_default)
    r.add_argument("--device", default=d.device, help="cpu (gloo, fp32) or cuda" + with_default)
    r.add_argument("--zero-stage", type=int, default=d.zero_stage, help="DeepSpeed ZeRO stage (a GPU run)" + with_default)
    r.add_argument("--bf16", action="store_true", default=d.bf16, help="train in bf16 through DeepSpeed (a GPU run)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p


def config_from_args(args: argparse.Namespace):
    from .config import TrainConfig, default_model

    sizes = {"dim": args.dim, "num_layers": args.layers, "num_heads": args.heads, "ffn_dim": args.ffn_dim}
    model = {**default_model(args.task), **{k: v for k, v in sizes.items() if v is not None}}
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**{**values, "model": model})


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(cfg.out)
    if not args.resume and (out / "checkpoints" / "latest").is_file():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.task == "embedded-avatar":
        from .avatar import AvatarTrainer as Trainer
    else:
        from .loop import Trainer
    trainer = Trainer(cfg)
    if args.resume and trainer.load_checkpoint():
        print(f"resumed at step {trainer.step} from {trainer.ckpt_dir}")
    print(trainer.describe())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    start = time.perf_counter()
    trainer.run(progress=not args.quiet, until=args.until)
    print(f"trained to step {trainer.step} in {time.perf_counter() - start:.0f} s this session "
          f"({trainer.elapsed:.0f} s of steps in total)")
    path = trainer.export(out / ("embedded_avatar.safetensors" if cfg.task == "embedded-avatar" else "embedded.safetensors"))
    print(f"exported EMA weights to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if cfg.eval_prompts:
        with (out / "log.jsonl").open("a") as log:
            result = trainer.log_eval(log)
        (out / "eval.json").write_text(json.dumps(result, indent=2, default=str))
    return 0
