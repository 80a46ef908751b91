"""A Wan DiT driven per frame (the embedded avatar model, docs/avatar_world.md): the chunk-causal DiT of
`dit.py` plus LiveAvatar's audio injection (spec/avatar.md §2.4.7) at tiny width.

Each latent frame has a drive vector (audio features of that frame's samples and the idle blink flag). A
per-frame MLP turns it into `num_drive_tokens` tokens and one global token (the `AudioTokens` of the S2V
model); after every block listed in `audio_inject_layers`, the frame's tokens get an AdaLN from the global
token and cross-attend to that frame's drive tokens — the S2V `AudioInjector`, reused. The reference image
is not an input here: the stream puts it in the self-attention cache as the sink frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SelfAttentionContext
from .config import DiTConfig
from .dit import CrossKV, WanDiT
from .s2v.audio import AudioTokens
from .s2v.injector import AudioInjector


@dataclass(frozen=True)
class DrivenDiTConfig(DiTConfig):
    """A DiT config plus the drive sizes."""

    drive_dim: int = 10
    num_drive_tokens: int = 2
    audio_inject_layers: tuple[int, ...] = (0, 1, 2, 3)
    audio_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "audio_inject_layers", tuple(int(i) for i in self.audio_inject_layers))
        if any(not 0 <= i < self.num_layers for i in self.audio_inject_layers):
            raise ValueError(f"audio_inject_layers {self.audio_inject_layers} outside 0..{self.num_layers - 1}")


class DriveEncoder(nn.Module):
    """Drive vectors [B, F, drive_dim] → AudioTokens: tokens [B, F, n, dim], global [B, F, 1, dim]. Per frame
    only, so a frame's tokens depend on its own drive (causal by construction)."""

    def __init__(self, cfg: DrivenDiTConfig) -> None:
        super().__init__()
        self.tokens = cfg.num_drive_tokens
        self.inp = nn.Linear(cfg.drive_dim, cfg.dim)
        self.out = nn.Linear(cfg.dim, (cfg.num_drive_tokens + 1) * cfg.dim)

    def forward(self, drive: Tensor) -> AudioTokens:
        h = self.out(F.silu(self.inp(drive.to(self.inp.weight.dtype)))).unflatten(-1, (self.tokens + 1, -1))
        return AudioTokens(h[:, :, :self.tokens], h[:, :, self.tokens:])


class DrivenDiT(WanDiT):
    """[B, C, F, H, W] latents + per-frame t [B, F] + per-frame drive [B, F, drive_dim] → flow."""

    cfg: DrivenDiTConfig

    def __init__(self, cfg: DrivenDiTConfig) -> None:
        super().__init__(cfg)
        self.drive_encoder = DriveEncoder(cfg)
        self.audio_injector = AudioInjector(cfg)

    def forward(self, x: Tensor, t: Tensor, cross: CrossKV, attn: SelfAttentionContext, drive: Tensor | None = None) -> Tensor:
        if drive is None or drive.shape[:2] != t.shape:
            raise ValueError(f"a driven DiT needs a drive vector per latent frame {tuple(t.shape)}, got "
                             f"{None if drive is None else tuple(drive.shape)}")
        grid = self.token_grid(x)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        e, e0 = self.embed_time(t)
        audio = self.drive_encoder(drive)
        for block in self.blocks:
            tokens = block(tokens, e0, grid, cross[block.index], attn)
            if block.index in self.audio_injector.position:
                tokens = self.audio_injector(block.index, tokens, audio)
        return self.unpatchify(self.head(tokens, e.unflatten(0, t.shape), grid.frames), grid)
