"""The embedded model's pieces: vocabulary text encoder, pixel latents/decoder, weights file, and the
training attention path equal to the stream's window-cache path (the positional scheme it trains with)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamgen.bundles.embedded import (
    EMBEDDED_STREAM,
    EmbeddedModel,
    PixelDecoder,
    VocabTextEncoder,
    embedded_bundle,
    frames_to_latents,
    load_weights,
    save_weights,
)
from streamgen.engine.noise import NoiseSource
from streamgen.engine.stream import Stream
from streamgen.models.attention import BlockCausalAttention
from streamgen.models.config import DiTConfig
from streamgen.sampling.few_step import FewStepSampler
from streamgen.sampling.schedule import FlowSchedule
from streamgen.train.attention import ChunkMaskAttention, recache_ids
from streamgen.world import (
    Prompt,
    WorldState,
    parse_prompt,
    prompt_tokens,
    render,
    sample_batch,
)

SMALL = DiTConfig(dim=64, ffn_dim=128, freq_dim=64, text_dim=32, text_len=4, num_heads=2, num_layers=2,
                  in_dim=3, out_dim=3, patch_size=(1, 4, 4))


@pytest.fixture(scope="module")
def model() -> EmbeddedModel:
    torch.manual_seed(0)
    return EmbeddedModel(SMALL).eval().requires_grad_(False)


def test_encoder_rows_and_zero_padding():
    enc = VocabTextEncoder(text_len=6, text_dim=16)
    ctx = enc.encode("a red square moving up")
    assert ctx.shape == (1, 6, 16)
    ids = prompt_tokens(Prompt("red", "square", "up"))
    assert torch.equal(ctx[0, :3], enc.embedding.weight[ids])
    assert torch.count_nonzero(ctx[0, 3:]) == 0


def test_encoder_ignores_unknown_words_and_follows_the_grammar():
    enc = VocabTextEncoder()
    ref = enc.encode("a red circle moving left")
    assert torch.equal(enc.encode("A big RED ball, heading to the LEFT quickly!"), ref)
    assert torch.equal(enc.encode("blue red circle left"), ref)            # the last mention wins
    assert torch.equal(enc.encode(""), enc.encode(parse_prompt("").prompt.text()))  # defaults
    assert not torch.equal(enc.encode("a red circle moving right"), ref)


def test_pixel_latents_and_decoder_round_trip_exactly():
    video, _ = sample_batch(3, 4, 6, 0.5, dtype=torch.uint8)               # [B, T, 3, 32, 32] uint8
    latents = frames_to_latents(video)
    assert latents.min() == -1 and latents.max() == 1
    out = PixelDecoder().push(latents)                                      # [B, T, 32, 32, 3]
    assert out.dtype == torch.uint8 and torch.equal(out, video.permute(0, 1, 3, 4, 2))
    frame = torch.from_numpy(render(WorldState(Prompt("cyan", "triangle", "down"), 2, 7)))
    assert torch.equal(PixelDecoder().push(frames_to_latents(frame)[None, None])[0, 0].permute(2, 0, 1),
                       (frame * 255).to(torch.uint8))


def _emulated_stream(model: EmbeddedModel, chunk_prompts: list[str], seed: int) -> torch.Tensor:
    """The stream's chunks re-derived with full-sequence forwards: chunk j is sampled by the engine's
    FewStepSampler with [x̂0 of earlier chunks at t = 0, x] through ChunkMaskAttention, frames at 0…F−1,
    the whole window under chunk j's prompt (re-cache) and the re-cached chunks in one block."""
    cfg = EMBEDDED_STREAM
    schedule = FlowSchedule(cfg.shift)
    sampler = FewStepSampler(schedule, schedule.step_list(list(cfg.steps), cfg.warp_steps), rerun=False)
    noise = NoiseSource(seed, (1, 3, 3, 32, 32))
    done: list[torch.Tensor] = []
    switch = None
    for j, prompt in enumerate(chunk_prompts):
        if j and prompt != chunk_prompts[j - 1]:
            switch = j
        tokens = torch.tensor([prompt_tokens(prompt)])
        ids = recache_ids(j + 1, j if switch == j else None)

        def flow(x, t, call, j=j, tokens=tokens, ids=ids):
            seq = torch.cat([*done, x], dim=1)
            ts = torch.cat([torch.zeros(1, 3 * j), t], dim=1)
            return model(seq, ts, tokens, ChunkMaskAttention(model.dit.rope, 3, ids))[:, 3 * j:]

        done.append(sampler.sample(flow, noise.initial(j), 3 * j, lambda k, j=j: noise.fresh(j, k)))
    return torch.cat(done, dim=1)


@pytest.mark.parametrize("chunk_prompts", [
    ["red circle left"] * 3,
    ["red circle left", "red circle left", "blue square up"],   # switch at chunk 2: chunks 0-1 re-cached together
    ["red circle left", "green triangle down", "green triangle down"],
])
def test_full_sequence_path_equals_the_window_cache_stream(model, chunk_prompts):
    from streamgen.bundles.embedded import bundle_from_model

    bundle = bundle_from_model(model)
    stream = Stream(bundle.dit, bundle.text_encoder, EMBEDDED_STREAM, chunk_prompts[0])
    chunks = []
    for j, prompt in enumerate(chunk_prompts):
        if j and prompt != chunk_prompts[j - 1]:
            stream.set_prompt(prompt)
        chunks.append(stream.next_chunk().latents)
    streamed = torch.cat(chunks, dim=1)
    assert (streamed - _emulated_stream(model, chunk_prompts, EMBEDDED_STREAM.seed)).abs().max() <= 1e-5


def test_chunk_mask_attention_equals_the_engine_block_causal_pass(model):
    torch.manual_seed(1)
    x, t = torch.randn(2, 9, 3, 32, 32), torch.rand(2, 9) * 1000
    tokens = torch.tensor([prompt_tokens("red circle left"), prompt_tokens("white box up")])
    ref = model(x, t, tokens, BlockCausalAttention(model.dit.rope, 3, 0))
    ours = model(x, t, tokens, ChunkMaskAttention(model.dit.rope, 3, torch.tensor([[0, 1, 2], [0, 1, 2]])))
    assert (ref - ours).abs().max() <= 1e-5
    assert recache_ids(3, None) == [0, 1, 2] and recache_ids(3, 1) == [0, 1, 2] and recache_ids(3, 2) == [0, 0, 1]


def test_weights_file_round_trip_and_missing_file(model, tmp_path):
    path = save_weights(model, tmp_path / "m.safetensors", note="test")
    loaded, stream, extra = load_weights(path)
    assert loaded.cfg == model.cfg and stream == EMBEDDED_STREAM and extra == {"note": "test"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    bundle = embedded_bundle(path)
    assert bundle.fps == 8 and bundle.stream.policy_settings["rope"] == "relative"
    with pytest.raises(FileNotFoundError, match="streamgen train"):
        embedded_bundle(tmp_path / "missing.safetensors")
    assert np.isfinite(bundle.text_encoder.encode("red").numpy()).all()


def test_prompt_ack_reports_unknown_words() -> None:
    """A prompt's acknowledgement says how it was understood: ignored words and defaulted attributes."""
    torch.manual_seed(0)
    model = EmbeddedModel()
    stream = Stream(model.dit.eval(), model.text, EMBEDDED_STREAM, "a red circle moving left")
    stream.set_prompt("the blue gizmo going up")
    ack = stream.next_chunk().acks[0]
    assert ack.detail["understood"] == "a blue circle moving up"
    assert ack.detail["unknown_words"] == ["gizmo"] and ack.detail["defaulted"] == ["shape"]
