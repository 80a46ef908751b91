"""Checkpoint loading against the real-layout fixtures (dit/ and longlive_lora/)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamgen.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_dit_weights,
    load_lora,
    merge_lora,
    normalize_key,
    read_tensors,
    unwrap_envelope,
)

FIXTURES = Path(__file__).parent / "fixtures"
WEIGHTS = FIXTURES / "dit" / "weights.safetensors"
CHECKPOINT = FIXTURES / "dit" / "checkpoint.pt"
LORA = FIXTURES / "longlive_lora" / "lora.pt"
MERGED = FIXTURES / "longlive_lora" / "merged_weights.safetensors"


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return load_file(WEIGHTS)


@pytest.fixture(scope="module")
def expected(base: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in base.items()}


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


# --- read_tensors ---------------------------------------------------------------------------


def test_read_tensors_safetensors_and_pt(base):
    assert_state_equal(read_tensors(WEIGHTS), base)
    assert set(read_tensors(CHECKPOINT)) == {"generator", "generator_ema"}


def test_read_tensors_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="not found") as info:
        read_tensors(missing)
    assert str(missing) in str(info.value)


def test_read_tensors_unknown_suffix(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint suffix '.ckpt'"):
        read_tensors(path)


def test_read_tensors_unreadable(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        read_tensors(path)
    assert str(path) in str(info.value)


# --- unwrap_envelope / normalize_key ---------------------------------------------------------


def test_unwrap_prefers_ema(caplog):
    obj = read_tensors(CHECKPOINT)
    with caplog.at_level(logging.INFO, logger="streamgen.models.checkpoint"):
        state, name = unwrap_envelope(obj)
    assert name == "generator_ema"
    assert state is obj["generator_ema"]
    assert "generator_ema" in caplog.text


def test_unwrap_without_ema_picks_generator():
    obj = read_tensors(CHECKPOINT)
    state, name = unwrap_envelope(obj, prefer_ema=False)
    assert name == "generator"
    assert state is obj["generator"]


def test_unwrap_model_and_flat(base):
    assert unwrap_envelope({"model": base}) == (base, "model")
    assert unwrap_envelope(base) == (base, "<flat>")


def test_unwrap_rejects_non_tensor_dict():
    with pytest.raises(CheckpointError, match="step"):
        unwrap_envelope({"critic": {}, "step": 3})


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.self_attn.q.weight", "blocks.0.self_attn.q.weight"),
        ("model._fsdp_wrapped_module.head.head.bias", "head.head.bias"),
        ("model.patch_embedding.weight", "patch_embedding.weight"),
        ("module.model.blocks.1.ffn.0.weight", "blocks.1.ffn.0.weight"),
        ("_orig_mod.blocks.0._checkpoint_wrapped_module.norm3.weight", "blocks.0.norm3.weight"),
        ("model.model.x", "model.x"),  # only ONE leading "model." is stripped
        ("blocks.0.modulation", "blocks.0.modulation"),
    ],
)
def test_normalize_key(raw, clean):
    assert normalize_key(raw) == clean


# --- check_state_dict ------------------------------------------------------------------------


def test_check_state_dict_accepts_exact_match(base, expected):
    check_state_dict(base, expected)


def test_check_state_dict_lists_every_problem(base, expected):
    state = dict(base)
    del state["head.head.bias"]
    state["blocks.0.bogus.weight"] = torch.zeros(3)
    state["blocks.1.ffn.0.weight"] = torch.zeros(128, 256)
    with pytest.raises(CheckpointError) as info:
        check_state_dict(state, expected)
    message = str(info.value)
    assert message.splitlines()[0] == (
        "state dict does not match the model: 1 missing, 1 unexpected, 1 mis-shaped"
    )
    assert "head.head.bias" in message
    assert "blocks.0.bogus.weight" in message
    assert "blocks.1.ffn.0.weight: got (128, 256), expected (256, 128)" in message


def test_check_state_dict_truncates_long_lists(expected):
    with pytest.raises(CheckpointError) as info:
        check_state_dict({}, expected)
    message = str(info.value)
    assert f"{len(expected)} missing" in message.splitlines()[0]
    assert f"... and {len(expected) - 20} more" in message
    assert sum(line.startswith("  ") and "more" not in line for line in message.splitlines()) == 20


# --- load_dit_weights ------------------------------------------------------------------------


def test_load_checkpoint_pt_equals_weights(base, expected):
    assert_state_equal(load_dit_weights(CHECKPOINT, expected), base)


def test_load_checkpoint_generator_differs(base, expected):
    state = load_dit_weights(CHECKPOINT, expected, prefer_ema=False)
    assert state.keys() == base.keys()
    assert not any(torch.equal(state[key], base[key]) for key in base)


def test_load_safetensors_flat(base, expected):
    assert_state_equal(load_dit_weights(WEIGHTS, expected), base)


def test_load_casts_dtype(base, expected):
    state = load_dit_weights(WEIGHTS, expected, dtype=torch.bfloat16)
    assert all(value.dtype == torch.bfloat16 for value in state.values())
    assert torch.equal(state["head.head.weight"], base["head.head.weight"].to(torch.bfloat16))


def test_load_rejects_key_collision(tmp_path, base, expected):
    path = tmp_path / "dup.pt"
    weight = base["head.head.bias"]
    torch.save({"generator": {"model.head.head.bias": weight, "module.model.head.head.bias": weight}}, path)
    with pytest.raises(CheckpointError, match="head.head.bias <- model.head.head.bias, module.model.head.head.bias"):
        load_dit_weights(path, expected)


def test_load_wrong_shapes_fail(expected):
    bad = dict(expected, **{"head.head.bias": (65,)})
    with pytest.raises(CheckpointError, match=r"head\.head\.bias: got \(64,\), expected \(65,\)"):
        load_dit_weights(CHECKPOINT, bad)


# --- LoRA ------------------------------------------------------------------------------------


def test_load_lora_takes_generator_adapter(tmp_path):
    raw = read_tensors(LORA)
    adapter = load_lora(LORA)
    assert_state_equal(adapter, raw["generator_lora"])
    assert not torch.equal(adapter[next(iter(adapter))], raw["critic_lora"][next(iter(adapter))])
    bare = tmp_path / "bare.pt"
    torch.save(raw["generator_lora"], bare)
    assert_state_equal(load_lora(bare), raw["generator_lora"])


def test_merge_matches_reference(base):
    want = load_file(MERGED)
    adapter = load_lora(LORA)
    merged = merge_lora(base, adapter)
    targets = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
               for key in adapter if key.endswith("lora_A.weight")}
    assert len(targets) == 20
    assert merged.keys() == want.keys()
    for key in want:
        if key in targets:
            assert not torch.equal(merged[key], base[key]), key
            torch.testing.assert_close(merged[key], want[key], atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(merged[key], want[key]), key
    assert_state_equal(base, load_file(WEIGHTS))  # input not mutated


def test_merge_alpha_half(base):
    adapter = load_lora(LORA)
    want = load_file(MERGED)
    half = merge_lora(base, adapter, alpha=2.0)
    modules = [key.removesuffix(".lora_A.weight") for key in adapter if key.endswith(".lora_A.weight")]
    assert len(modules) == 20
    for module in modules:
        key = module.removeprefix("base_model.model.") + ".weight"
        a = adapter[f"{module}.lora_A.weight"].double()
        b = adapter[f"{module}.lora_B.weight"].double()
        torch.testing.assert_close(half[key], (base[key].double() + 0.5 * b @ a).float(), atol=1e-6, rtol=1e-6)
        assert (half[key] - want[key]).abs().max() > 0.01, key


def test_load_dit_weights_with_lora(expected):
    state = load_dit_weights(CHECKPOINT, expected, lora_path=LORA, lora_alpha=4.0)
    want = load_file(MERGED)
    for key in want:
        torch.testing.assert_close(state[key], want[key], atol=1e-6, rtol=1e-6)


def test_merge_reports_bad_lora_keys(base):
    adapter = dict(load_lora(LORA))
    adapter["base_model.model.blocks.0.self_attn.q.lora_C.weight"] = torch.zeros(4, 128)
    adapter["base_model.model.blocks.9.ffn.0.lora_A.weight"] = torch.zeros(4, 128)
    adapter["base_model.model.blocks.9.ffn.0.lora_B.weight"] = torch.zeros(256, 4)
    del adapter["base_model.model.blocks.1.ffn.2.lora_B.weight"]
    adapter["base_model.model.blocks.0.ffn.0.lora_B.weight"] = torch.zeros(256, 3)
    with pytest.raises(CheckpointError) as info:
        merge_lora(base, adapter)
    message = str(info.value)
    assert message.splitlines()[0] == "cannot merge LoRA: 4 problem(s)"
    assert "blocks.0.self_attn.q.lora_C.weight: not base_model.model" in message
    assert "blocks.9.ffn.0: base weight blocks.9.ffn.0.weight not in state dict" in message
    assert "blocks.1.ffn.2: incomplete pair, lora_B missing" in message
    assert "blocks.0.ffn.0: shapes inconsistent" in message
