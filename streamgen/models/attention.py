"""The one attention seam: every attention in streamgen goes through `attention()`.

torch SDPA is the default. xformers / flash-attention are used only when installed, on a GPU, and
when no mask is needed; they are never required.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "xformers", "flash")


@functools.cache
def _optional(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except Exception:  # broken CUDA builds raise more than ImportError
        return None


def pick_backend(q: Tensor, mask: Tensor | None) -> str:
    wanted = os.environ.get("STREAMGEN_ATTENTION", "auto")
    if wanted not in BACKENDS:
        raise ValueError(f"STREAMGEN_ATTENTION={wanted!r}; known backends: {', '.join(BACKENDS)}")
    gpu_ok = q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16)
    if wanted in ("auto", "flash") and gpu_ok and _optional("flash_attn") is not None:
        return "flash"
    if wanted in ("auto", "xformers") and gpu_ok and _optional("xformers.ops") is not None:
        return "xformers"
    return "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention on [B, L, heads, head_dim] tensors (scale 1/√head_dim); mask: bool [Lq, Lk]."""
    backend = pick_backend(q, mask)
    if backend == "flash":
        return _optional("flash_attn").flash_attn_func(q, k, v)
    if backend == "xformers":
        return _optional("xformers.ops").memory_efficient_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class TokenGrid(tuple):
    """(frames, height, width) of a call's tokens after patching; tokens are (f, h, w) row-major."""

    def __new__(cls, frames: int, height: int, width: int) -> "TokenGrid":
        return super().__new__(cls, (frames, height, width))

    frames = property(lambda self: self[0])
    height = property(lambda self: self[1])
    width = property(lambda self: self[2])
    tokens_per_frame = property(lambda self: self[1] * self[2])


class SelfAttentionContext:
    """What the DiT asks for self-attention in one forward call: un-roped q, k, v in, output out.

    Implementations decide positions (RoPE), which keys are cached, evicted and attended. The DiT
    never branches on model or policy names.
    """

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        raise NotImplementedError


class BlockCausalAttention(SelfAttentionContext):
    """Full-sequence (training / reference) path: block-causal mask, absolute frames from `start_frame`.

    A token of block j sees every token of blocks ≤ j, bidirectionally inside its own block.
    """

    def __init__(self, rope, frames_per_block: int, start_frame: int = 0) -> None:
        self.rope = rope
        self.frames_per_block = frames_per_block
        self.start_frame = start_frame

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        frames = range(self.start_frame, self.start_frame + grid.frames)
        q = self.rope.apply(q, frames, grid.height, grid.width)
        k = self.rope.apply(k, frames, grid.height, grid.width)
        block = torch.arange(grid.frames).repeat_interleave(grid.tokens_per_frame) // self.frames_per_block
        return attention(q, k, v, mask=block[None, :] <= block[:, None])


class BatchedAttention(SelfAttentionContext):
    """Runs one context per batch element, so independent streams or timestep slots share a forward."""

    def __init__(self, contexts: list[SelfAttentionContext], sizes: list[int] | None = None) -> None:
        self.contexts = contexts
        self.sizes = sizes or [1] * len(contexts)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        parts = zip(self.contexts, q.split(self.sizes), k.split(self.sizes), v.split(self.sizes))
        return torch.cat([ctx(layer, qi, ki, vi, grid) for ctx, qi, ki, vi in parts])
