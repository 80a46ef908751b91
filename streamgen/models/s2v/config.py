"""Hyper-parameters of the S2V DiT; defaults are Wan2.2-S2V-14B as LiveAvatar runs it (spec §2.1)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import DiTConfig


@dataclass(frozen=True)
class S2VConfig(DiTConfig):
    """A Wan DiT config plus the S2V sizes; the two `emulate_*` switches reproduce the reference's
    dtype quirks (fp16 RoPE factors, bf16 cross-attention input) that hold even in fp32 runs."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    rope_max_frames: int = 45000
    cond_dim: int = 16
    audio_dim: int = 1024
    audio_layers: int = 25  # wav2vec2 hidden states: embedding output + 24 layers
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    audio_norm_eps: float = 1e-5  # the injectors' AdaLayerNorm (diffusers default)
    motion_frames: int = 73  # video frames of motion context: the audio left-pad length
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)  # FramePack 1x / 2x / 4x latent frames, newest first
    ref_rope_frame: int = 30  # temporal RoPE index of the reference tokens before the roll
    emulate_fp16_rope: bool = True
    emulate_bf16_cross_input: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "audio_inject_layers", tuple(int(i) for i in self.audio_inject_layers))
        object.__setattr__(self, "zip_frame_buckets", tuple(int(i) for i in self.zip_frame_buckets))
        if any(not 0 <= i < self.num_layers for i in self.audio_inject_layers):
            raise ValueError(f"audio_inject_layers {self.audio_inject_layers} outside 0..{self.num_layers - 1}")
        if self.dim % 4:
            raise ValueError(f"dim {self.dim} must be divisible by 4 (audio encoder width dim/4)")

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames of the motion context (VAE: 1 + 4k video frames): the audio tokens dropped."""
        return (self.motion_frames + 3) // 4
