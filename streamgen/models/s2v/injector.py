"""Audio injectors (spec §2.4.7): after each listed block, the noisy tokens of every latent frame get an
AdaLN (driven by that frame's global audio token) and cross-attend to that frame's audio tokens."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import attention
from ..dit import Attention, LayerNorm
from ..config import DiTConfig
from .audio import AudioTokens


class AdaLayerNorm(nn.Module):
    """diffusers AdaLayerNorm(chunk_dim=1): linear(SiLU(temb)) -> (shift, scale), shift first."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class AudioInjector(nn.Module):
    """Keys `audio_injector.injector.{i}` and `.injector_adain_layers.{i}`, i = position in audio_inject_layers.
    `cfg` is any DiT config with `audio_inject_layers` and `audio_norm_eps` (S2VConfig, DrivenDiTConfig)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.position = {layer: i for i, layer in enumerate(cfg.audio_inject_layers)}
        self.injector = nn.ModuleList(Attention(cfg) for _ in cfg.audio_inject_layers)
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(cfg.dim, cfg.audio_norm_eps) for _ in cfg.audio_inject_layers)

    def forward(self, layer: int, x: Tensor, audio: AudioTokens) -> Tensor:
        """x [B, F·S, dim] noisy tokens after block `layer` -> x plus the audio residual."""
        i = self.position[layer]
        b, f = audio.tokens.shape[:2]
        frames = x.unflatten(1, (f, -1)).flatten(0, 1)  # [B·F, S, dim]
        h = self.injector_adain_layers[i](frames, audio.global_.flatten(0, 1))  # temb [B·F, 1, dim]
        attn = self.injector[i]
        q = attn.split(attn.norm_q(attn.q(h)))
        k, v = attn.kv(audio.tokens.flatten(0, 1))
        out = attn.o(attention(q, k, v).flatten(2))
        return x + out.unflatten(0, (b, f)).flatten(1, 2)
