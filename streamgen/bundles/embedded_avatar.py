"""The embedded avatar model `embedded-avatar`: a small driven Wan DiT trained on the avatar world
(docs/avatar_world.md, docs/embedded_avatar.md).

Latents are pixels, as for the embedded text model (`embedded.py`): the decoder is exact. The reference
picture is mapped onto the world's identity (colour, head shape) and rendered at rest; that frame is the
cache's sink. Each frame's drive is the avatar world's features of its own 1,000 samples (16 kHz, 16 fps)
plus the stream's blink schedule (seeded by the stream's seed). No text: any prompt is ignored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..audio import SAMPLE_RATE
from ..avatar_world import DRIVE_DIM, FPS, SAMPLES_PER_FRAME, BlinkSchedule, drive_features, identity_from_image
from ..avatar_world.face import reference_frame
from ..engine.stream import StreamConfig
from ..errors import InputError
from ..models.attention import SelfAttentionContext
from ..models.driven_dit import DrivenDiT, DrivenDiTConfig
from .builtins import BUILTINS
from .bundle import ModelBundle
from .embedded import PixelDecoder, frames_to_latents, parameter_count, read_weights

WEIGHTS_PATH = Path(__file__).parent / "weights" / "embedded_avatar.safetensors"
FORMAT = "streamgen-embedded-avatar-v1"

#: 4 layers × 128 wide over 4×4 pixel patches, drive injected after every block; ~1.7M parameters.
AVATAR_DIT = DrivenDiTConfig(dim=128, ffn_dim=512, freq_dim=128, text_dim=16, text_len=1, num_heads=4, num_layers=4,
                             in_dim=3, out_dim=3, patch_size=(1, 4, 4), drive_dim=DRIVE_DIM, num_drive_tokens=2,
                             audio_inject_layers=(0, 1, 2, 3))
AVATAR_STREAM = BUILTINS["embedded-avatar"].stream_config()


class NoText(nn.Module):
    """The avatar has no text: every prompt maps to one learned context row (the cross-attention's constant)."""

    def __init__(self, text_dim: int) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.zeros(1, 1, text_dim))

    @torch.no_grad()
    def encode(self, prompt: str) -> Tensor:
        return self.row.detach()

    def describe(self, prompt: str) -> dict:
        words = prompt.split() if isinstance(prompt, str) else []
        return {"understood": "", "unknown_words": words, "defaulted": [],
                "note": "the avatar model takes no text: its reference picture and its audio drive it"}

    def vocabulary(self) -> dict[str, list[str]]:
        return {}


class AvatarModel(nn.Module):
    """Driven DiT + its constant text row, trained jointly; the unit that is optimised and exported."""

    def __init__(self, cfg: DrivenDiTConfig = AVATAR_DIT) -> None:
        super().__init__()
        self.dit = DrivenDiT(cfg)
        self.text = NoText(cfg.text_dim)

    @property
    def cfg(self) -> DrivenDiTConfig:
        return self.dit.cfg

    def forward(self, x: Tensor, t: Tensor, drive: Tensor, attn: SelfAttentionContext) -> Tensor:
        """Flow for latents x [B, F, C, H, W] (frame 0 the reference) at t [B, F] under drive [B, F, D]."""
        cross = self.dit.cross_kv(self.text.row.expand(x.shape[0], -1, -1))
        return self.dit(x.transpose(1, 2), t, cross, attn, drive=drive).transpose(1, 2)


class WorldDriver:
    """One stream's drive on the avatar world: its samples' features and its own blink schedule, which keeps its
    place from chunk to chunk (a long stream does not replay its blinks from frame 0 every chunk)."""

    def __init__(self, blinks: BlinkSchedule) -> None:
        self.blinks = blinks

    def __call__(self, samples: np.ndarray, first_frame: int) -> Tensor:
        frames = len(samples) // SAMPLES_PER_FRAME
        return torch.from_numpy(drive_features(samples, self.blinks.window(first_frame, frames), frames))[None]


class WorldAudioDrive:
    """`AudioDriven` for the embedded avatar: the avatar world's features and blink schedule."""

    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME

    def driver(self, seed: int) -> WorldDriver:
        return WorldDriver(BlinkSchedule(seed))

    def rest_drive(self) -> Tensor:
        return torch.from_numpy(drive_features(np.zeros(SAMPLES_PER_FRAME, np.float32), None, 1))[None]

    def reference_latent(self, image: np.ndarray) -> Tensor:
        try:
            identity = identity_from_image(image)
        except ValueError as e:
            raise InputError(f"reference picture: {e}") from None
        return frames_to_latents(torch.from_numpy(reference_frame(identity)))[None, None]


def save_weights(model: AvatarModel, path: str | Path, stream: StreamConfig = AVATAR_STREAM, **extra: Any) -> Path:
    """The model's weights (keys `dit.*`, `text.*`) and its DiT config to one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT, "dit": json.dumps(model.cfg.to_dict()),
                                            **{k: json.dumps(v) for k, v in extra.items()}})
    return path


def load_weights(path: str | Path = WEIGHTS_PATH) -> tuple[AvatarModel, dict[str, Any]]:
    """A weights file → (model in eval mode, fp32; the extra metadata)."""
    meta, tensors = read_weights(path, FORMAT, "train them with `streamgen train --model embedded-avatar --out DIR`")
    model = AvatarModel(DrivenDiTConfig.from_dict(json.loads(meta["dit"])))
    model.load_state_dict(tensors, strict=True)
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "dit")}
    return model.eval().requires_grad_(False), extra


def bundle_from_model(model: AvatarModel, stream: StreamConfig = AVATAR_STREAM) -> ModelBundle:
    """Wrap a (trained) avatar model as a servable bundle."""
    return ModelBundle(name="embedded-avatar", dit=model.dit, text_encoder=model.text, decoder=PixelDecoder,
                       stream=stream, fps=float(FPS), example_prompt="",
                       description=f"embedded {parameter_count(model) / 1e6:.2f}M-parameter audio-driven Wan DiT on the "
                                   "avatar world (32×32 pixels as latents, 16 fps, reference picture + 16 kHz audio)",
                       avatar=WorldAudioDrive())


def embedded_avatar_bundle(weights_path: str | Path | None = None) -> ModelBundle:
    model, _ = load_weights(weights_path or WEIGHTS_PATH)
    return bundle_from_model(model)
