"""Hyper-parameters of a Wan2.1-style chunk-causal DiT, read from config so no size is hard-coded."""
from __future__ import annotations

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
