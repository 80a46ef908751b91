"""The embedded default model: a small Wan DiT trained on the procedural world (docs/embedded_model.md).

Latents are pixels: a frame [3, 32, 32] in [0, 1] is the latent 2·p − 1, so the decoder is exact
and free, and with 4×4 patches one token is one step of the world's motion. The text encoder is a
learned table over the world's 15-token vocabulary. Everything else (DiT, sampler, cache policy,
Stream) is the engine's own code, so this model exercises exactly what the big models run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.stream import StreamConfig
from ..models.attention import SelfAttentionContext
from ..models.config import DiTConfig
from ..models.decoders import to_uint8
from ..models.dit import WanDiT
from ..world import FPS, NULL_TOKEN, VALUES, VOCAB, VOCAB_SIZE, parse_prompt, prompt_tokens
from .builtins import BUILTINS
from .bundle import ModelBundle

WEIGHTS_PATH = Path(__file__).parent / "weights" / "embedded.safetensors"
FORMAT = "streamgen-embedded-v1"

#: The DiT: 4 layers × 128 wide over 4×4 pixel patches (64 tokens per 32×32 frame); ~1.3M parameters.
EMBEDDED_DIT = DiTConfig(dim=128, ffn_dim=512, freq_dim=128, text_dim=64, text_len=4, num_heads=4, num_layers=4,
                         in_dim=3, out_dim=3, patch_size=(1, 4, 4))

#: How it streams (see builtins.py).
EMBEDDED_STREAM = BUILTINS["embedded"].stream_config()


# --- latents ---------------------------------------------------------------------------------------

def frames_to_latents(frames01: Tensor) -> Tensor:
    """World frames [..., 3, 32, 32] in [0, 1] (or uint8) → latents 2·p − 1 in [−1, 1]."""
    x = frames01.float() / 255.0 if frames01.dtype == torch.uint8 else frames01.float()
    return 2.0 * x - 1.0


def latents_to_frames(latents: Tensor) -> Tensor:
    """Latents → frames in [0, 1] (clamped), the inverse of `frames_to_latents`."""
    return ((latents.float() + 1.0) * 0.5).clamp(0.0, 1.0)


class PixelDecoder:
    """Identity decoder: latent frame i is video frame i; clamp to [0, 1] and round to uint8. Stateless."""

    def reset(self) -> None:
        """Nothing to forget."""

    def video_frame(self, latent_frame: int) -> int:
        return latent_frame

    def push(self, latents: Tensor) -> Tensor:
        """[B, F, 3, H, W] latents → [B, F, H, W, 3] uint8."""
        return to_uint8(latents_to_frames(latents))


# --- text --------------------------------------------------------------------------------------------

class VocabTextEncoder(nn.Module):
    """Context = [colour, shape, direction] rows of a learned table over VOCAB, then zero rows to text_len.

    The zero rows are real inputs, not masked: the DiT's text MLP turns them into one constant key,
    a no-op slot the cross-attention can fall back on.
    """

    def __init__(self, text_len: int = 4, text_dim: int = 64) -> None:
        super().__init__()
        if text_len < 3:
            raise ValueError(f"text_len must hold the 3 prompt tokens, got {text_len}")
        self.text_len, self.text_dim = text_len, text_dim
        self.embedding = nn.Embedding(VOCAB_SIZE, text_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids [B, 3] (NULL_TOKEN allowed, e.g. caption dropout) → context [B, text_len, text_dim]."""
        rows = self.embedding(tokens)
        pad = rows.new_zeros(tokens.shape[0], self.text_len - tokens.shape[1], self.text_dim)
        return torch.cat([rows, pad], dim=1)

    @torch.no_grad()
    def encode(self, prompt: str) -> Tensor:
        """Prompt text → [1, text_len, text_dim]. Parsed by the world grammar: unknown words are ignored,
        unmentioned attributes take the defaults (white circle moving right)."""
        ids = torch.tensor([prompt_tokens(parse_prompt(prompt).prompt)], device=self.embedding.weight.device)
        return self.forward(ids)

    def describe(self, prompt: str) -> dict:
        """How the prompt was understood, for the acknowledgement: canonical text, ignored and defaulted words."""
        parsed = parse_prompt(prompt)
        return {"understood": parsed.prompt.text(), "unknown_words": list(parsed.unknown_words),
                "defaulted": list(parsed.defaulted)}

    def vocabulary(self) -> dict[str, list[str]]:
        """The words it knows, by attribute; any other word is ignored (docs/world.md)."""
        return {attribute: list(words) for attribute, words in VALUES.items()}

    def null(self) -> Tensor:
        """The unconditional context (all NULL_TOKEN rows), [1, text_len, text_dim]."""
        return self.forward(torch.full((1, 3), NULL_TOKEN, device=self.embedding.weight.device))


# --- the trainable unit -------------------------------------------------------------------------------

class EmbeddedModel(nn.Module):
    """DiT + text encoder, trained jointly; the unit that is optimised, checkpointed and exported."""

    def __init__(self, cfg: DiTConfig = EMBEDDED_DIT) -> None:
        super().__init__()
        if (cfg.in_dim, cfg.out_dim) != (3, 3):
            raise ValueError("latents are RGB pixels: in_dim = out_dim = 3")
        self.dit = WanDiT(cfg)
        self.text = VocabTextEncoder(cfg.text_len, cfg.text_dim)

    @property
    def cfg(self) -> DiTConfig:
        return self.dit.cfg

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, attn: SelfAttentionContext) -> Tensor:
        """Flow prediction for latents x [B, F, C, H, W] at timesteps t [B, F] under prompt ids [B, 3]."""
        cross = self.dit.cross_kv(self.text(tokens))
        return self.dit(x.transpose(1, 2), t, cross, attn).transpose(1, 2)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- weights file -------------------------------------------------------------------------------------

def weights_metadata(cfg: DiTConfig, stream: StreamConfig = EMBEDDED_STREAM, **extra: Any) -> dict[str, str]:
    """safetensors metadata (strings only): the format tag, the DiT config and the stream settings."""
    stream_settings = {k: v for k, v in asdict(stream).items() if k not in ("transition", "dtype")}
    return {"format": FORMAT, "dit": json.dumps(cfg.to_dict()), "stream": json.dumps(stream_settings),
            "vocab": json.dumps(list(VOCAB)), **{k: json.dumps(v) for k, v in extra.items()}}


def save_weights(model: EmbeddedModel, path: str | Path, dtype: torch.dtype = torch.float32,
                 stream: StreamConfig = EMBEDDED_STREAM, **extra: Any) -> Path:
    """Write the model's weights (keys `dit.*`, `text.*`) and how to stream it to one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=weights_metadata(model.cfg, stream, **extra))
    return path


def read_weights(path: str | Path, format: str, train_hint: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, fp32 tensors) of an in-repo model's weights file of this `format`; clear errors for a
    missing file (with how to train one) or another kind of file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found at {path}; {train_hint}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    if meta.get("format") != format:
        raise ValueError(f"{path} is not a {format} weights file (format={meta.get('format')!r})")
    return meta, tensors


def load_weights(path: str | Path = WEIGHTS_PATH) -> tuple[EmbeddedModel, StreamConfig, dict[str, Any]]:
    """Read a weights file: (model in eval mode, fp32; its stream settings; the extra metadata)."""
    meta, tensors = read_weights(path, FORMAT, "train them with `streamgen train --out DIR` and pass "
                                               "DIR/embedded.safetensors")
    if json.loads(meta["vocab"]) != list(VOCAB):
        raise ValueError(f"{path} was trained on another world vocabulary; retrain it")
    cfg = DiTConfig.from_dict(json.loads(meta["dit"]))
    model = EmbeddedModel(cfg)
    model.load_state_dict(tensors, strict=True)
    stream = replace(EMBEDDED_STREAM, **{k: (tuple(v) if k == "steps" else v) for k, v in json.loads(meta["stream"]).items()})
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "dit", "stream", "vocab")}
    return model.eval().requires_grad_(False), stream, extra


def bundle_from_model(model: EmbeddedModel, stream: StreamConfig = EMBEDDED_STREAM, name: str = "embedded",
                      description: str = "") -> ModelBundle:
    """Wrap a (trained) model as a servable bundle: DiT, vocabulary encoder, pixel decoder, stream settings."""
    return ModelBundle(name=name, dit=model.dit, text_encoder=model.text, decoder=PixelDecoder, stream=stream,
                       fps=float(FPS), description=description or
                       f"embedded {parameter_count(model) / 1e6:.2f}M-parameter Wan DiT on the procedural world "
                       "(32×32 pixels as latents, 8 fps)", example_prompt="a red circle moving right")


def embedded_bundle(weights_path: str | Path | None = None) -> ModelBundle:
    """The embedded default model from `weights_path` (default: the shipped streamgen/bundles/weights file)."""
    model, stream, _ = load_weights(weights_path or WEIGHTS_PATH)
    return bundle_from_model(model, stream)
