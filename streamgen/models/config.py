"""Hyper-parameters of the models (the Wan2.1-style chunk-causal DiT, umT5, TAEHV), read from config so
no size is hard-coded; torch-free, so model family YAMLs validate without importing torch."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DiTConfig:
    """Shape of the transformer; defaults are Wan2.1-T2V-1.3B (spec §a.1)."""

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_frames: int = 1024

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if tuple(self.patch_size)[0] != 1:
            raise ValueError("temporal patch size must be 1 (one token row per latent frame)")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiTConfig":
        """Build from a model or fixture config, ignoring keys that describe pipelines, not the network."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "patch_size" else v) for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    encoder_layers: int
    num_buckets: int = 32
    shared_pos: bool = False
    relative_max_dist: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets % 2:
            raise ValueError(f"bidirectional bucketing needs an even num_buckets, got {self.num_buckets}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UMT5Config":
        """Build from a config dict (fixture meta or real config); unrelated keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count implied by the config (no allocation)."""
        per_layer = (
            4 * self.dim * self.dim_attn          # q, k, v (dim -> dim_attn), o (dim_attn -> dim)
            + 3 * self.dim * self.dim_ffn          # gate, fc1, fc2
            + 2 * self.dim                         # norm1, norm2
            + (0 if self.shared_pos else self.num_buckets * self.num_heads)
        )
        shared = self.num_buckets * self.num_heads if self.shared_pos else 0
        return self.vocab_size * self.dim + self.encoder_layers * per_layer + self.dim + shared


@dataclass(frozen=True)
class TAEHVConfig:
    """Constructor values of the reference ``TAEHV``; the defaults are the ``taew2_1`` ones."""

    latent_channels: int = 16
    image_channels: int = 3
    patch_size: int = 1
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)

    def __post_init__(self) -> None:
        if self.patch_size != 1:
            raise ValueError(f"patch_size {self.patch_size} not supported (taew2_1 uses 1; taew2_2 is a different model)")
        if len(self.decoder_widths) != 4:
            raise ValueError(f"decoder_widths needs 4 entries (3 stages + output), got {self.decoder_widths}")
        for name in ("encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 entries (one per stage), got {getattr(self, name)}")

    @property
    def t_downscale(self) -> int:
        return math.prod(2 if down else 1 for down in self.encoder_time_downscale)

    @property
    def t_upscale(self) -> int:
        return math.prod(2 if up else 1 for up in self.decoder_time_upscale)

    @property
    def frames_to_trim(self) -> int:
        """Raw decoded frames dropped at the start, so T latents give the Wan VAE's 4T - 3 frames."""
        return self.t_upscale - 1

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "TAEHVConfig":
        """Build from a fixture meta.json: switches from ``config.constructor``, widths from
        ``architecture`` (the reference constructor has no width argument, so only the layer list says)."""
        cfg = meta.get("config", {})
        ctor = cfg.get("constructor", {})
        kwargs: dict[str, Any] = {}
        if ctor.get("latent_channels") is not None:
            kwargs["latent_channels"] = int(ctor["latent_channels"])
        if ctor.get("patch_size") is not None:
            kwargs["patch_size"] = int(ctor["patch_size"])
        if cfg.get("image_channels") is not None:
            kwargs["image_channels"] = int(cfg["image_channels"])
        for name in ("encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            if ctor.get(name) is not None:
                kwargs[name] = tuple(bool(v) for v in ctor[name])
        arch = meta.get("architecture", {})
        enc_convs = [layer["out_ch"] for layer in arch.get("encoder", []) if layer.get("type") == "Conv2d"]
        dec_convs = [layer["out_ch"] for layer in arch.get("decoder", []) if layer.get("type") == "Conv2d"]
        if enc_convs:
            kwargs["encoder_width"] = int(enc_convs[0])
        if dec_convs:
            kwargs["decoder_widths"] = tuple(int(c) for c in dec_convs[:-1])
        return cls(**kwargs)
