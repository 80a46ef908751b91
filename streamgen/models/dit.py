"""The Wan2.1 chunk-causal DiT (spec §a.2), read in one sitting.

Key names equal the released checkpoints' (spec §a.4). Self-attention is delegated to a
`SelfAttentionContext` (cache policy or full-sequence mask); cross-attention K/V are computed once
per prompt (`cross_kv`) and reused for every call until the prompt changes.

Precision (spec §a.5): weights and activations run in the dtype of the weights (`WanDiT.cast`), except
the time embedding and the modulation, which stay fp32 as in the original Wan2.1 (`keeps_fp32`); norms
compute in fp32 and RoPE in float64 whatever the dtype; the residual stream stays in the weights' dtype
(as in the causal references, so results differ from them at bf16 rounding level only). In fp32 every
cast below is a no-op.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import SelfAttentionContext, TokenGrid, attention
from .config import DiTConfig
from .rope import Rope3D

CrossKV = list[tuple[Tensor, Tensor]]  # per block: K (after RMSNorm), V, each [B, text_len, heads, head_dim]


def keeps_fp32(name: str) -> bool:
    """Parameters that stay fp32 in any dtype (all small): the time embedding and the modulation tables,
    which the original Wan2.1 computes in fp32 under autocast, and the affine LayerNorm (norm3), which
    computes in fp32."""
    return (name.startswith(("time_embedding.", "time_projection.")) or name.rsplit(".", 1)[-1] == "modulation"
            or ".norm3." in name)


@torch.compiler.disable
def _self_attention(attn: SelfAttentionContext, block: nn.Module, q: Tensor, k: Tensor, v: Tensor,
                    grid: TokenGrid) -> Tensor:
    # An eager island under torch.compile: cache policies are Python bookkeeping (counters, slots) that
    # change every call. The block, not its int index, crosses the boundary, so one compiled graph
    # serves every block instead of one recompile per layer index.
    return attn(block.index, q, k, v, grid)


def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """[cos, sin] features of float timesteps, ω_k = 10000^(-k/half), computed in float64."""
    half = dim // 2
    pos = t.to(torch.float64)
    angles = torch.outer(pos, torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RMSNorm(nn.Module):
    """RMS norm over all channels (all heads jointly), computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (as original Wan2.1) and cast back."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)


class Attention(nn.Module):
    """q/k/v/o projections with q/k RMSNorm; shared by self- and cross-attention."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.norm_k(self.k(x))), self.split(self.v(x))


class Block(nn.Module):
    """Modulated self-attention, ungated cross-attention with affine norm3, modulated FFN."""

    def __init__(self, cfg: DiTConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.self_attn = Attention(cfg)
        self.cross_attn = Attention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e0: Tensor, grid: TokenGrid, cross: tuple[Tensor, Tensor], attn: SelfAttentionContext) -> Tensor:
        f = grid.frames
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)

        def per_frame(y: Tensor) -> Tensor:  # [B, L, dim] -> [B, F, S, dim]
            return y.unflatten(1, (f, -1))

        h = (per_frame(self.norm1(x)) * (1 + scale_a) + shift_a).flatten(1, 2).type_as(x)
        sa = self.self_attn
        q = sa.split(sa.norm_q(sa.q(h)))
        k, v = sa.kv(h)
        y = sa.o(_self_attention(attn, self, q, k, v, grid).flatten(2))
        x = x + (per_frame(y) * gate_a).flatten(1, 2).type_as(x)

        ca = self.cross_attn
        q = ca.split(ca.norm_q(ca.q(self.cross_input(x))))
        x = x + ca.o(attention(q, *cross).flatten(2))

        h = (per_frame(self.norm2(x)) * (1 + scale_f) + shift_f).flatten(1, 2).type_as(x)
        return x + (per_frame(self.ffn(h)) * gate_f).flatten(1, 2).type_as(x)

    def cross_input(self, x: Tensor) -> Tensor:
        """The cross-attention query input; a seam because the S2V model rounds it through bf16 first."""
        return self.norm3(x)


class Head(nn.Module):
    """Output head modulated by the time embedding e (not e0), then Linear to patch values."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor, frames: int) -> Tensor:
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head((self.norm(x).unflatten(1, (frames, -1)) * (1 + scale) + shift).type_as(x))


class WanDiT(nn.Module):
    """Chunk-causal Wan2.1 DiT: [B, C, F, H, W] latents + per-frame timesteps [B, F] -> flow."""

    block_class: type[Block] = Block  # a seam: the S2V model swaps in its block

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(self.block_class(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = Rope3D(cfg.head_dim, cfg.rope_theta, cfg.rope_max_frames)

    def token_grid(self, x: Tensor) -> TokenGrid:
        _, _, f, h, w = x.shape
        _, ph, pw = self.cfg.patch_size
        return TokenGrid(f, h // ph, w // pw)

    def cross_kv(self, context: Tensor) -> CrossKV:
        """Per-block cross-attention K/V of a text context [B, text_len, text_dim]; cache per prompt.
        The context may come in any float dtype (text encoders give fp32): it is cast to the DiT's."""
        emb = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return [block.cross_attn.kv(emb) for block in self.blocks]

    def embed_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame timesteps [B, F] -> e [B·F, dim] (head) and e0 [B, F, 6, dim] (block modulation)."""
        e = self.time_embedding(timestep_sinusoid(t.flatten(), self.cfg.freq_dim).to(self.time_embedding[0].weight.dtype))
        return e, self.time_projection(e).unflatten(1, (6, self.cfg.dim)).unflatten(0, t.shape)

    def forward(self, x: Tensor, t: Tensor, cross: CrossKV, attn: SelfAttentionContext) -> Tensor:
        grid = self.token_grid(x)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        e, e0 = self.embed_time(t)
        for block in self.blocks:
            tokens = block(tokens, e0, grid, cross[block.index], attn)
        out = self.head(tokens, e.unflatten(0, t.shape), grid.frames)
        return self.unpatchify(out, grid)

    def unpatchify(self, out: Tensor, grid: TokenGrid) -> Tensor:
        """[B, F, S, pt·ph·pw·C] (channels fastest) -> [B, C, F·pt, H, W]."""
        pt, ph, pw = self.cfg.patch_size
        b = out.shape[0]
        u = out.reshape(b, grid.frames, grid.height, grid.width, pt, ph, pw, self.cfg.out_dim)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(b, self.cfg.out_dim, grid.frames * pt, grid.height * ph, grid.width * pw)

    def cast(self, dtype: torch.dtype) -> WanDiT:
        """Weights to `dtype` in place, `keeps_fp32` parameters to fp32 (never rounded through `dtype`)."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint keys and shapes this configuration loads (825 keys for Wan2.1-1.3B)."""
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}
