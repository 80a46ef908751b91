"""Wan umT5 text encoder against the umt5/ fixture (real key names, tiny config)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamgen.models.checkpoint import CheckpointError
from streamgen.models.umt5 import (
    UMT5Config,
    UMT5Encoder,
    UMT5PromptEncoder,
    UMT5Tokenizer,
    clean_prompt,
    context_from_hidden,
    load_umt5_weights,
    relative_position_buckets,
)
from streamgen.parity import verify_fixture

FIXTURE = Path(__file__).parent / "fixtures" / "umt5"
WEIGHTS = FIXTURE / "weights.safetensors"
META = json.loads((FIXTURE / "meta.json").read_text())
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "tensors.safetensors")


@pytest.fixture(scope="module")
def cfg() -> UMT5Config:
    return UMT5Config.from_dict(META["config"])


@pytest.fixture()
def model(cfg: UMT5Config) -> UMT5Encoder:
    return load_umt5_weights(WEIGHTS, UMT5Encoder(cfg)).eval()


def test_fixture_parity_via_dispatcher() -> None:
    report = verify_fixture(FIXTURE, atol=ATOL, rtol=RTOL)
    assert report.passed, report.render()
    assert {name for name, _, _ in report.rows} == {"encoder_out_raw", "context"}


def test_encoder_and_context_match_golden(model: UMT5Encoder, golden: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        hidden = model(golden["ids"], golden["mask"])
    torch.testing.assert_close(hidden, golden["encoder_out_raw"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(context_from_hidden(hidden, golden["mask"]), golden["context"], atol=ATOL, rtol=RTOL)


def test_padding_rows_exactly_zero(model: UMT5Encoder, golden: dict[str, torch.Tensor]) -> None:
    ids, mask = golden["ids"], golden["mask"]
    with torch.no_grad():
        hidden = model(ids, mask)
    context = context_from_hidden(hidden, mask)
    for row, n in enumerate(META["config"]["valid_lengths"]):
        assert int(mask[row].sum()) == n
        assert torch.count_nonzero(context[row, n:]) == 0
        assert torch.equal(context[row, :n], hidden[row, :n])
        assert hidden[row, n:].abs().amin(dim=-1).gt(0).any(), "raw padding rows should not be zero"


def test_mask_hides_padding_tokens(model: UMT5Encoder, golden: dict[str, torch.Tensor]) -> None:
    ids, mask = golden["ids"].clone(), golden["mask"]
    with torch.no_grad():
        before = context_from_hidden(model(ids, mask), mask)
        ids[mask == 0] = 7  # change what sits in the padding slots
        after = context_from_hidden(model(ids, mask), mask)
        unmasked = context_from_hidden(model(ids, torch.ones_like(mask)), mask)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert (unmasked - before).abs().max() > 1e-2, "without the mask padding must leak into real rows"


def test_relative_bias_is_used(model: UMT5Encoder, golden: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for block in model.blocks:
            block.pos_embedding.embedding.weight.zero_()
        hidden = model(golden["ids"], golden["mask"])
    expected = golden["encoder_out_raw"]
    assert not torch.allclose(hidden, expected, atol=ATOL, rtol=RTOL)
    assert (hidden - expected).norm() / expected.norm() > 0.05


def test_per_layer_bias_is_used(model: UMT5Encoder, golden: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():  # only the last layer's table: shared_pos=False means each layer matters
        model.blocks[-1].pos_embedding.embedding.weight.zero_()
        hidden = model(golden["ids"], golden["mask"])
    assert not torch.allclose(hidden, golden["encoder_out_raw"], atol=ATOL, rtol=RTOL)


def test_bidirectional_buckets() -> None:
    idx = relative_position_buckets(1, 2001, num_buckets=32, max_dist=128)[0]  # query at 0, keys 0..2000
    rev = relative_position_buckets(2001, 1, num_buckets=32, max_dist=128)[:, 0]  # keys before the query
    after = {0: 0, 1: 17, 7: 23, 8: 24, 15: 25, 16: 26, 32: 28, 64: 30, 127: 31, 2000: 31}
    before = {1: 1, 7: 7, 8: 8, 15: 9, 16: 10, 32: 12, 64: 14, 127: 15, 2000: 15}
    assert {d: int(idx[d]) for d in after} == after
    assert {d: int(rev[d]) for d in before} == before
    assert int(idx.max()) == 31 and int(rev.max()) == 15


def test_no_attention_scaling(cfg: UMT5Config) -> None:
    """One layer, identity-ish weights: the attention logits must be q.k without 1/sqrt(d)."""
    torch.manual_seed(0)
    attn = UMT5Encoder(cfg).blocks[0].attn
    x = torch.randn(1, 5, cfg.dim)
    q = attn.q(x).view(1, 5, cfg.num_heads, -1)
    k = attn.k(x).view(1, 5, cfg.num_heads, -1)
    v = attn.v(x).view(1, 5, cfg.num_heads, -1)
    p = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k), dim=-1)
    want = attn.o(torch.einsum("bnij,bjnc->binc", p, v).reshape(1, 5, -1))
    torch.testing.assert_close(attn(x, None, None), want)


def test_wrong_keys_are_named(cfg: UMT5Config, tmp_path: Path) -> None:
    state = load_file(WEIGHTS)
    state["blocks.0.attn.query.weight"] = state.pop("blocks.0.attn.q.weight")
    state["norm.weight"] = torch.ones(cfg.dim + 1)
    del state["blocks.1.pos_embedding.embedding.weight"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError) as err:
        load_umt5_weights(bad, UMT5Encoder(cfg))
    msg = str(err.value)
    for name in ("blocks.0.attn.q.weight", "blocks.0.attn.query.weight", "norm.weight",
                 "blocks.1.pos_embedding.embedding.weight"):
        assert name in msg
    assert "1 missing" not in msg and "2 missing" in msg and "1 unexpected" in msg and "1 mis-shaped" in msg


def test_fixture_keys_are_the_model_keys(cfg: UMT5Config) -> None:
    assert UMT5Encoder(cfg).expected_shapes() == {k: tuple(v.shape) for k, v in load_file(WEIGHTS).items()}


def test_real_size_parameter_count_on_meta() -> None:
    real = META["real_umt5_xxl_config"]
    rcfg = UMT5Config.from_dict(real)
    d, da, f, h, n, v, b = (real[k] for k in ("dim", "dim_attn", "dim_ffn", "num_heads", "encoder_layers",
                                              "vocab_size", "num_buckets"))
    implied = v * d + n * (4 * d * da + 3 * d * f + 2 * d + b * h) + d
    assert implied == 5_680_910_336
    with torch.device("meta"):
        big = UMT5Encoder(rcfg)
    assert all(p.is_meta for p in big.parameters())
    assert sum(p.numel() for p in big.parameters()) == implied == rcfg.num_parameters()
    assert len(big.state_dict()) == 2 + 10 * n


def test_load_into_meta_model_assigns(cfg: UMT5Config, golden: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    load_umt5_weights(WEIGHTS, model).eval()
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(golden["ids"], golden["mask"]), golden["encoder_out_raw"], atol=ATOL, rtol=RTOL)


def test_clean_prompt() -> None:
    assert clean_prompt("  a  cat\n\tsits &amp;amp; waits \u3000 ") == "a cat sits & waits"
    assert clean_prompt("&lt;b&gt;") == "<b>"
    assert clean_prompt("") == ""


def _char_tokenizer(text_len: int) -> UMT5Tokenizer:
    return UMT5Tokenizer(lambda s: [2 + (ord(c) % 200) for c in s], text_len=text_len)


def test_tokenizer_eos_padding_truncation() -> None:
    tok = _char_tokenizer(8)
    ids, mask = tok(["ab", "  a\n b  ", "abcdefghijk"])
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (3, 8)
    assert ids[0].tolist() == [2 + 97, 2 + 98, 1, 0, 0, 0, 0, 0]
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1, :4].tolist() == [2 + 97, 2 + 32, 2 + 98, 1]  # cleaned to "a b"
    assert ids[2, -1] == 1 and mask[2].all() and ids[2, :7].tolist() == [2 + ord(c) for c in "abcdefg"]


def test_tokenizer_from_dir(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    ids, mask = UMT5Tokenizer.from_dir(tmp_path, text_len=6)(["a  cat dog"])
    assert ids.tolist() == [[3, 4, 2, 1, 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 0, 0]]


def test_tokenizer_missing_dir_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        UMT5Tokenizer.from_dir(tmp_path / "google" / "umt5-xxl")


def test_prompt_encoder_context_and_lru(model: UMT5Encoder, golden: dict[str, torch.Tensor]) -> None:
    seq_len = META["config"]["seq_len"]
    table = {"p0": golden["ids"][0], "p1": golden["ids"][1]}
    calls: list[list[str]] = []

    def tokenizer(prompts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(list(prompts))
        ids = torch.stack([table[p][:text_len] for p in prompts])
        return ids, (ids != 0).long()

    enc = UMT5PromptEncoder(tokenizer, model, text_len=seq_len, cache_size=1)
    out = enc.encode(["p0", "p1"])
    assert out.shape == (2, seq_len, META["config"]["dim"])
    torch.testing.assert_close(out, golden["context"], atol=ATOL, rtol=RTOL)
    again = enc.encode(["p1"])  # most recent entry is cached
    assert calls == [["p0", "p1"]] and torch.equal(again[0], out[1])
    enc.encode(["p0"])  # p0 was evicted (cache_size 1)
    assert calls[-1] == ["p0"]
