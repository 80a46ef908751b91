"""Training of the embedded model through DeepSpeed (single CPU process): learning, exact resume,
export → bundle → stream, and the eval hook. A tiny DiT keeps it to seconds."""
from __future__ import annotations

import json

import pytest
import torch

from streamgen.bundles.embedded import embedded_bundle
from streamgen.engine.frame_stream import FrameStream
from streamgen.models.config import DiTConfig
from streamgen.train.config import TrainConfig
from streamgen.train.loop import Trainer

TINY = DiTConfig(dim=32, ffn_dim=64, freq_dim=32, text_dim=16, text_len=4, num_heads=2, num_layers=2,
                 in_dim=3, out_dim=3, patch_size=(1, 4, 4)).to_dict()


def config(out, **kw) -> TrainConfig:
    base = dict(out=str(out), seed=7, phase1_steps=3, phase2_steps=3, batch=4, p2_batch=2, p2_max_rollout=2,
                p2_switch_prob=0.5, p2_mix=0.0, warmup=2, ckpt_every=2, log_every=1, threads=None,
                eval_prompts=0, model=TINY)
    return TrainConfig(**{**base, **kw})


def test_deepspeed_steps_reduce_the_loss_on_a_fixed_batch(tmp_path):
    trainer = Trainer(config(tmp_path, lr=3e-3, warmup=1, phase1_steps=50))
    inp = trainer.inputs(0)
    losses = [trainer.optimize(inp) for _ in range(12)]
    assert trainer.engine.__class__.__name__ == "DeepSpeedEngine"
    assert losses[-1] < 0.6 * losses[0], losses


def _next_loss(trainer: Trainer) -> float:
    return trainer.train_step()["loss"]


def test_resume_continues_exactly(tmp_path):
    straight = Trainer(config(tmp_path / "a"))
    straight.run(progress=False, until=4)            # 3 phase-1 steps, then phase 2 (rollouts)
    expected = _next_loss(straight)

    first = Trainer(config(tmp_path / "b"))
    first.run(progress=False, until=4)               # checkpoints at 2 and 4
    resumed = Trainer(config(tmp_path / "b"))
    assert resumed.load_checkpoint() and resumed.step == 4
    assert resumed.ema.updates == straight.ema.updates - 1
    for k, v in first.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[k], v)
    opt_a, opt_b = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert resumed.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert _next_loss(resumed) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="peak learning rate"):
        Trainer(config(tmp_path / "b", lr=5e-3)).load_checkpoint()


def test_export_loads_as_a_bundle_that_streams_and_evaluates(tmp_path):
    from streamgen.train.evaluate import eval_prompts, evaluate

    trainer = Trainer(config(tmp_path, ckpt_every=0))
    trainer.run(progress=False)
    path = trainer.export(tmp_path / "embedded.safetensors")
    bundle = embedded_bundle(path)
    stream = FrameStream(bundle, "a green box moving up")
    chunk = stream.next()
    assert chunk.frames.shape == (3, 32, 32, 3) and chunk.frames.dtype == torch.uint8
    stream.set_prompt("magenta triangle left")
    assert [a.frame for a in stream.next().acks] == [3]
    assert len(eval_prompts(4, 12)) == 4 and isinstance(eval_prompts(4, 12)[1], list)
    result = evaluate(bundle, [["a red circle moving left"][0], [(0, "blue square up"), (6, "blue square down")]], 12)
    s = result["summary"]
    assert s["streams"] == 2 and s["frames"] == 12 and 0 <= s["colour"] <= 1 and s["tokens_per_s"] > 0
    assert result["runs"][1]["switch_latency"]["direction"]["switches"] == 1


def test_lead_in_clips_move_otherwise_then_as_prompted_and_carry_no_loss(tmp_path):
    from streamgen.train.data import CHUNK, clip_batch, step_seed
    from streamgen.world.checker import STILL, analyze
    from streamgen.world.vocab import DIRECTIONS, TOKEN_OFFSET

    cb = clip_batch(11, 48, 3, switch_prob=0.3, lead_in_prob=0.6)
    lead = cb.lead_in_chunks
    assert ((lead > 0) & (cb.switch_chunk >= 0)).sum() == 0          # only clips without a switch
    assert (lead > 0).sum() >= 12 and (lead == 0).sum() >= 4 and lead.max() <= 2
    kinds = set()
    for b in range(48):
        a = analyze(((cb.latents[b] + 1) / 2).numpy())
        prompted = [DIRECTIONS[int(cb.chunk_tokens[b, t // CHUNK, 2]) - TOKEN_OFFSET["direction"]] for t in range(9)]
        last = int(lead[b]) * CHUNK - 1
        assert all(a.direction[t] == prompted[t] for t in range(max(last + 1, 1), 9)), (b, last, a.direction)
        if last > 0:
            prompted = prompted[0]
            before = set(a.direction[1:last + 1])
            assert len(before) == 1 and prompted not in before, (b, last, a.direction)  # one other motion, or still
            kinds |= before
    assert STILL in kinds and len(kinds) >= 3
    assert (clip_batch(11, 48, 3, switch_prob=0.3).lead_in_chunks == 0).all()
    still = clip_batch(11, 48, 3, switch_prob=0.3, lead_in_prob=0.6, lead_in_motion="still")
    for b in range(48):
        last = int(still.lead_in_chunks[b]) * CHUNK - 1
        assert all(torch.equal(still.latents[b, t], still.latents[b, last]) for t in range(max(last, 0)))

    trainer = Trainer(config(tmp_path, lead_in_prob=0.6, batch=16))
    for step in range(3):
        inp = trainer.inputs(step)
        cb = clip_batch(step_seed(7, step, 0), 16, 3, 0.3, 0.6)
        for b in range(16):
            assert not inp.weight[b, :int(cb.lead_in_chunks[b])].any()   # the lead-in is context only


def test_phase2_gives_no_loss_where_the_teacher_found_nothing(tmp_path, monkeypatch):
    import numpy as np

    from streamgen.train import self_forcing

    trainer = Trainer(config(tmp_path, phase1_steps=0, p2_mix=0.0, p2_own_prob=0.0, p2_batch=4))
    found = np.array([True, False, True, False])

    def teacher(tl, chunk, last_frame):  # the real teacher, with its detection result fixed by the test
        target, _ = real_teacher(tl, chunk, last_frame)
        return target, found

    real_teacher = self_forcing.teacher_chunk
    monkeypatch.setattr(self_forcing, "teacher_chunk", teacher)
    seen = 0
    for step in range(12):
        inp = trainer.inputs(step)
        if inp.info["rollout"]:
            seen += 1
            assert inp.weight[:, -1].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert seen
