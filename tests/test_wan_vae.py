"""Wan2.1 VAE: fixture parity, exact streaming decode, per-stream state, key checking, frame counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamgen.models.checkpoint import CheckpointError
from streamgen.models.wan_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE, load_wan_vae
from streamgen.parity import verify_fixture

FIXTURE = Path(__file__).parent / "fixtures" / "wan_vae"
WEIGHTS = FIXTURE / "weights.safetensors"


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((FIXTURE / "meta.json").read_text())


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "tensors.safetensors")


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(WEIGHTS)


@pytest.fixture(scope="module")
def vae(meta: dict, tensors: dict[str, torch.Tensor]) -> WanVAE:
    return load_wan_vae(WEIGHTS, meta["config"], latent_mean=tensors["latent_mean"], latent_std=tensors["latent_std"])


@pytest.fixture(scope="module")
def z_norm(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors["latent_norm"]


@pytest.fixture(scope="module")
def full(vae: WanVAE, z_norm: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z_norm)


def stream(vae: WanVAE, z: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    decoder = vae.stream_decoder()
    out, start = [], 0
    for size in sizes:
        out.append(decoder.push(z[:, :, start : start + size]))
        start += size
    assert start == z.shape[2]
    return out


def test_parity_passes() -> None:
    report = verify_fixture(FIXTURE)
    names = {row[0] for row in report.rows}
    golden = {"decode_full", "decode_stream.chunk0", "decode_stream.chunk1", "decode_stream.chunk2", "encode_mu_norm"}
    assert golden <= names, report.render()
    assert report.passed, report.render()


def test_decode_matches_fixture_and_is_unclamped(full: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(full, tensors["decode_full"], atol=1e-4, rtol=1e-4)
    assert full.abs().max() > 1.0  # raw decoder output; clamping is the pipeline's job


@pytest.mark.parametrize("sizes", [[1, 3, 3], [3, 3, 1], [1] * 7, [2, 5], [7], [4, 1, 2], [6, 1]])
def test_any_chunking_equals_one_shot_bit_exactly(vae: WanVAE, z_norm: torch.Tensor, full: torch.Tensor, sizes: list[int]) -> None:
    chunks = stream(vae, z_norm, sizes)
    expected_frames = [4 * s - (3 if i == 0 else 0) for i, s in enumerate(sizes)]
    assert [c.shape[2] for c in chunks] == expected_frames
    assert torch.equal(torch.cat(chunks, dim=2), full)


def test_fixture_stream_chunks(vae: WanVAE, z_norm: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    for i, chunk in enumerate(stream(vae, z_norm, [1, 3, 3])):
        torch.testing.assert_close(chunk, tensors[f"decode_stream.chunk{i}"], atol=1e-4, rtol=1e-4)


def test_interleaved_streams_equal_each_alone(vae: WanVAE, z_norm: torch.Tensor, full: torch.Tensor) -> None:
    other = torch.randn(z_norm.shape, generator=torch.Generator().manual_seed(0))
    alone_other = torch.cat(stream(vae, other, [2, 2, 3]), dim=2)
    a, b = vae.stream_decoder(), vae.stream_decoder()
    out_a, out_b = [], []
    for (sa, ea), (sb, eb) in zip([(0, 1), (1, 4), (4, 7)], [(0, 2), (2, 4), (4, 7)]):
        out_a.append(a.push(z_norm[:, :, sa:ea]))
        out_b.append(b.push(other[:, :, sb:eb]))
    assert torch.equal(torch.cat(out_a, dim=2), full)
    assert torch.equal(torch.cat(out_b, dim=2), alone_other)
    assert not torch.allclose(alone_other, full)


def test_carried_state_matters(vae: WanVAE, z_norm: torch.Tensor, full: torch.Tensor) -> None:
    """A fresh stream for a later chunk restarts (first latent → 1 frame) and differs from the continuation."""
    decoder = vae.stream_decoder()
    decoder.push(z_norm[:, :, :3])
    decoder.reset()
    restarted = decoder.push(z_norm[:, :, 3:6])
    assert restarted.shape[2] == 9
    continued = full[:, :, 9 + 3 : 9 + 12]  # the same 9 trailing frames of chunk [3:6] in the one-shot decode
    assert not torch.allclose(restarted, continued, atol=1e-3)


def test_reset_starts_a_new_stream(vae: WanVAE, z_norm: torch.Tensor, full: torch.Tensor) -> None:
    decoder = vae.stream_decoder()
    decoder.push(torch.randn_like(z_norm[:, :, :4]))
    decoder.reset()
    assert decoder.latents_seen == 0
    assert torch.equal(torch.cat([decoder.push(z_norm[:, :, :5]), decoder.push(z_norm[:, :, 5:])], dim=2), full)


def test_frame_counts(vae: WanVAE, z_norm: torch.Tensor) -> None:
    _, _, _, h, w = z_norm.shape
    with torch.no_grad():
        for t in range(1, 5):
            assert vae.decode(z_norm[:, :, :t]).shape == (1, 3, 4 * t - 3, 8 * h, 8 * w)
    decoder = vae.stream_decoder()
    counts = []
    for i in range(4):
        expected = decoder.frames_for(1)
        frames = decoder.push(z_norm[:, :, i : i + 1])
        assert frames.shape[2] == expected
        counts.append(frames.shape[2])
    assert counts == [1, 4, 4, 4]
    assert decoder.push(z_norm[:, :, :0]).shape == (1, 3, 0, 8 * h, 8 * w)


def test_encode_shape_and_frame_rule(vae: WanVAE, tensors: dict[str, torch.Tensor]) -> None:
    video = tensors["video"]
    with torch.no_grad():
        mu = vae.encode(video)
        assert mu.shape == (1, 16, 1 + (video.shape[2] - 1) // 4, video.shape[3] // 8, video.shape[4] // 8)
        assert vae.encode(video[:, :, :1]).shape[2] == 1
        with pytest.raises(ValueError, match="1 \\+ 4"):
            vae.encode(video[:, :, :8])


def test_wrong_keys_are_named(meta: dict, state: dict[str, torch.Tensor]) -> None:
    bad = dict(state)
    del bad["decoder.head.2.bias"]
    bad["decoder.upsamples.3.time_kernel.weight"] = bad.pop("decoder.upsamples.3.time_conv.weight")
    bad["conv2.weight"] = torch.zeros(16, 16, 3, 1, 1)
    with pytest.raises(CheckpointError) as info:
        WanVAE.from_state_dict(bad, **WanVAE.config_kwargs(meta["config"]))
    message = str(info.value)
    for name in ("decoder.head.2.bias", "decoder.upsamples.3.time_conv.weight",
                 "decoder.upsamples.3.time_kernel.weight", "conv2.weight"):
        assert name in message, message
    assert "2 missing, 1 unexpected, 1 mis-shaped" in message


def test_wrong_dim_is_reported(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="mis-shaped"):
        WanVAE.from_state_dict(state, dim=8)


def test_loads_torch_checkpoint_and_infers_dim(tmp_path: Path, state: dict[str, torch.Tensor], z_norm: torch.Tensor, full: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(state, path)
    vae = load_wan_vae(path, latent_mean=tensors["latent_mean"], latent_std=tensors["latent_std"])
    with torch.no_grad():
        assert torch.equal(vae.decode(z_norm), full)


def test_stream_rejects_geometry_change(vae: WanVAE, z_norm: torch.Tensor) -> None:
    decoder = vae.stream_decoder()
    decoder.push(z_norm[:, :, :1])
    with pytest.raises(ValueError, match="reset"):
        decoder.push(z_norm[:, :, 1:2, :2, :2])


def test_real_size_structure(state: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        real = WanVAE(dim=96)
    shapes = real.expected_shapes()
    assert len(shapes) == 194 and shapes.keys() == state.keys()
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (params(real), params(real.encoder), params(real.decoder)) == pytest.approx((126.9e6, 53.6e6, 73.3e6), rel=1e-3)


def test_default_latent_stats_are_wan21(tensors: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(torch.tensor(WAN21_LATENT_MEAN), tensors["latent_mean"])
    torch.testing.assert_close(torch.tensor(WAN21_LATENT_STD), tensors["latent_std"])
    vae = WanVAE(dim=4)  # default stats: the spec constants
    mu = torch.randn(1, 16, 2, 3, 3)
    torch.testing.assert_close(vae.normalize(mu), (mu - tensors["latent_mean"].view(1, -1, 1, 1, 1)) / tensors["latent_std"].view(1, -1, 1, 1, 1))
    torch.testing.assert_close(vae.denormalize(vae.normalize(mu)), mu)
