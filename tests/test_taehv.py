"""TAEHV (taew2_1) against the shared taehv fixture: parity, exact streaming decode, loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamgen.models.checkpoint import CheckpointError
from streamgen.models.taehv import TAEHV, MemBlock, TAEHVConfig, TAEHVStreamDecoder, load_taehv_state

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "taehv"
WEIGHTS = FIXTURE / "weights.safetensors"

pytestmark = pytest.mark.skipif(
    not (FIXTURE / "meta.json").is_file(),
    reason=f"taehv fixture not found at {FIXTURE} (it is too large for the repo; it lives in the shared folder)",
)


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURE / "meta.json").read_text())


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "tensors.safetensors"))


@pytest.fixture(scope="module")
def raw_weights() -> dict[str, torch.Tensor]:
    return load_file(str(WEIGHTS))


@pytest.fixture(scope="module")
def model(meta) -> TAEHV:
    return TAEHV.from_checkpoint(WEIGHTS, TAEHVConfig.from_meta(meta))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def stream_decode(decoder: TAEHVStreamDecoder, latents: torch.Tensor) -> list[torch.Tensor]:
    return [decoder.push(latents[:, i:i + 1]) for i in range(latents.shape[1])]


# --- parity -------------------------------------------------------------------------------------


def test_fixture_parity() -> None:
    from streamgen.parity import verify_fixture

    report = verify_fixture(FIXTURE)
    names = {name for name, _, _ in report.rows}
    for required in ("decode_parallel", "decode_stream", "decode_stream_frames_per_latent", "decode.raw",
                     "decode.after_decoder.2", "decode.after_decoder.6", "encode"):
        assert required in names, f"{required} was not compared"
    assert report.passed, report.render()


def test_state_dict_keys_are_the_real_names(model, raw_weights) -> None:
    shapes = model.expected_shapes()
    assert len(shapes) == 128
    assert shapes == {k: tuple(v.shape) for k, v in raw_weights.items()}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_config_from_meta(meta) -> None:
    cfg = TAEHVConfig.from_meta(meta)
    assert cfg.decoder_widths == (256, 128, 64, 64) and cfg.encoder_width == 64
    assert cfg.frames_to_trim == meta["config"]["frames_to_trim"]
    assert cfg.t_downscale == meta["config"]["t_downscale"] and cfg.t_upscale == meta["config"]["t_upscale"]


# --- streaming ----------------------------------------------------------------------------------


def test_stream_frames_per_latent_and_values(model, tensors) -> None:
    latents = tensors["latents"]
    pieces = stream_decode(TAEHVStreamDecoder(model), latents)
    assert [p.shape[1] for p in pieces] == tensors["decode_stream_frames_per_latent"].tolist() == [1, 4, 4, 4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(pieces, dim=1), tensors["decode_stream"], atol=1e-4, rtol=1e-4)


def test_stream_chunked_pushes_and_reset(model, tensors) -> None:
    latents = tensors["latents"]
    decoder = TAEHVStreamDecoder(model)
    chunked = torch.cat([decoder.push(latents[:, :3]), decoder.push(latents[:, 3:])], dim=1)
    torch.testing.assert_close(chunked, tensors["decode_stream"], atol=1e-4, rtol=1e-4)
    decoder.reset()
    first = decoder.push(latents[:, :1])
    assert first.shape[1] == 1
    torch.testing.assert_close(first, tensors["decode_stream"][:, :1], atol=1e-4, rtol=1e-4)


def test_interleaved_streams_do_not_interfere(model, tensors) -> None:
    a = tensors["latents"][:, :4]
    b = -tensors["latents"].flip(1)[:, :4]
    alone_a = torch.cat(stream_decode(TAEHVStreamDecoder(model), a), dim=1)
    alone_b = torch.cat(stream_decode(TAEHVStreamDecoder(model), b), dim=1)
    assert rel_l2(alone_a, alone_b) > 0.05  # different inputs, so crosstalk would show
    sa, sb = TAEHVStreamDecoder(model), TAEHVStreamDecoder(model)
    got_a, got_b = [], []
    for i in range(a.shape[1]):
        got_a.append(sa.push(a[:, i:i + 1]))
        got_b.append(sb.push(b[:, i:i + 1]))
    torch.testing.assert_close(torch.cat(got_a, dim=1), alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_b, dim=1), alone_b, atol=1e-5, rtol=1e-5)


def test_memblock_memory_matters(model, tensors, meta, monkeypatch) -> None:
    """With every MemBlock's past zeroed the decode moves by the fixture's measured 16 %."""
    forward = MemBlock.forward
    monkeypatch.setattr(MemBlock, "forward", lambda self, x, past: forward(self, x, torch.zeros_like(past)))
    with torch.no_grad():
        no_memory = model.decode_video(tensors["latents"])
    change = rel_l2(no_memory, tensors["decode_parallel"])
    assert change > 0.05
    assert change == pytest.approx(meta["sensitivity_checks"]["rel_change_decode_without_memblock_memory"], abs=1e-3)


# --- loading ------------------------------------------------------------------------------------


def test_wrong_keys_are_all_named(model, raw_weights) -> None:
    state = dict(raw_weights)
    del state["decoder.9.conv.2.bias"]
    state["decoder.99.weight"] = torch.zeros(1)
    state["encoder.17.weight"] = torch.zeros(16, 64, 1, 1)
    with pytest.raises(CheckpointError) as info:
        load_taehv_state(state, model)
    message = str(info.value)
    assert "decoder.9.conv.2.bias" in message and "decoder.99.weight" in message
    assert "encoder.17.weight" in message and "(16, 64, 3, 3)" in message


def test_tgrow_patch_keeps_last_output_channels(model, raw_weights, tmp_path) -> None:
    real = raw_weights["decoder.7.conv.weight"]  # TGrow stride 1: [256, 256, 1, 1]
    state = dict(raw_weights)
    state["decoder.7.conv.weight"] = torch.cat([torch.randn_like(real), real])  # as trained with stride 2
    for path, save in ((tmp_path / "t.safetensors", lambda s, p: save_file(s, str(p))),
                       (tmp_path / "t.pth", torch.save)):
        save(state, path)
        loaded = load_taehv_state(path, model)
        assert loaded["decoder.7.conv.weight"].dtype == torch.float32
        assert torch.equal(loaded["decoder.7.conv.weight"], real.float())
    state["decoder.7.conv.weight"] = real[:128]  # fewer channels is not patched: it is an error
    with pytest.raises(CheckpointError, match=r"decoder\.7\.conv\.weight"):
        load_taehv_state(state, model)
