"""LiveAvatar's causal audio encoder (key prefix `casual_audio_encoder`, the reference's spelling; spec §2.4):
25 wav2vec2 layers weighted, causal Conv1d stack of stride 4, per latent frame num_audio_token local
tokens + a learned padding token, and one global token for the injectors' AdaLN."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dit import LayerNorm
from .config import S2VConfig


class AudioTokens(NamedTuple):
    """Per latent frame: `tokens` [B, F, num_audio_token + 1, dim] (cross-attention K/V) and
    `global_` [B, F, 1, dim] (AdaLN conditioning)."""

    tokens: Tensor
    global_: Tensor


class CausalConv1d(nn.Module):
    """Conv1d with kernel-1 frames of left replicate padding: output t sees inputs ≤ t only."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class MotionEncoder(nn.Module):
    """The conv stack: a local branch split into num_audio_token heads and a global branch, sharing
    conv2 / conv3 (spec §2.4.5)."""

    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__()
        hidden = cfg.dim // 4
        self.heads = cfg.num_audio_token
        self.conv1_local = CausalConv1d(cfg.audio_dim, hidden * cfg.num_audio_token)
        self.conv1_global = CausalConv1d(cfg.audio_dim, hidden)
        self.conv2 = CausalConv1d(hidden, hidden * 2, stride=2)
        self.conv3 = CausalConv1d(hidden * 2, cfg.dim, stride=2)
        self.norms = nn.ModuleList(LayerNorm(c, cfg.eps, elementwise_affine=False) for c in (hidden, hidden * 2, cfg.dim))
        self.final_linear = nn.Linear(cfg.dim, cfg.dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, cfg.dim))

    def _norm_act(self, x: Tensor, i: int) -> Tensor:
        """LayerNorm over channels of [N, C, T], then SiLU; returned as [N, C, T]."""
        return F.silu(self.norms[i](x.transpose(1, 2))).transpose(1, 2)

    def _shared(self, x: Tensor) -> Tensor:
        """conv2 and conv3 with their norms: [N, hidden, T] -> [N, T', dim]."""
        x = self._norm_act(self.conv2(x), 1)
        return self._norm_act(self.conv3(x), 2).transpose(1, 2)

    def forward(self, x: Tensor) -> AudioTokens:
        """x [B, audio_dim, T] -> tokens [B, T', heads + 1, dim], global [B, T', 1, dim]."""
        b = x.shape[0]
        local = self.conv1_local(x).unflatten(1, (self.heads, -1)).flatten(0, 1)  # channel = head·hidden + c
        local = self._shared(self._norm_act(local, 0)).unflatten(0, (b, self.heads)).transpose(1, 2)
        pad = self.padding_tokens.expand(b, local.shape[1], 1, -1)
        glob = self.final_linear(self._shared(self._norm_act(self.conv1_global(x), 0)))
        return AudioTokens(torch.cat([local, pad.to(local.dtype)], dim=2), glob.unsqueeze(2))


class CausalAudioEncoder(nn.Module):
    """One block's wav2vec2 features [B, layers, audio_dim, T] -> AudioTokens of its T/4 latent frames.

    The block is left-padded with `motion_frames` copies of its first frame and the tokens of the pad
    are dropped, so no audio context crosses block boundaries (as in the reference)."""

    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__()
        self.pad_frames, self.drop_tokens = cfg.motion_frames, cfg.motion_latent_frames
        self.weights = nn.Parameter(torch.ones(1, cfg.audio_layers, 1, 1))
        self.encoder = MotionEncoder(cfg)

    def forward(self, features: Tensor) -> AudioTokens:
        features = torch.cat([features[..., :1].expand(*features.shape[:-1], self.pad_frames), features], dim=-1)
        w = F.silu(self.weights.float())
        mixed = ((features.float() * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, audio_dim, T]
        out = self.encoder(mixed.to(self.encoder.conv2.conv.weight.dtype))
        return AudioTokens(out.tokens[:, self.drop_tokens:], out.global_[:, self.drop_tokens:])
