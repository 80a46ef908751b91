"""Weight-only quantization of the DiT's block linears: int8 or fp8 (e4m3) weights, one scale per output channel.

What it saves: the q/k/v/o projections of self- and cross-attention and the two FFN linears hold 98% of
Wan2.1-1.3B's weights (1,391,984,640 of 1,418,996,800). Stored as int8 / float8_e4m3fn they take 1 byte
each instead of 2 (bf16) or 4 (fp32): 1.39 GB instead of 2.78 GB in bf16 (5.57 GB in fp32), plus
4 bytes of scale per output channel (2.7 MB). Embeddings, the head, norms and the modulation stay as
they are. Activations are not quantized: each layer dequantizes its weight to the activation dtype on
the fly (one transient [out, in] copy per call) and runs an ordinary matmul, on the CPU and on CUDA
alike (fp8 matmuls through `torch._scaled_mm` would quantize activations too, which changes the numerics).
On the CPU this is for correctness and memory, not speed: the dequantization is extra work.

Quantize after loading: checkpoints load by their real key names into plain `nn.Linear`s, then
`quantize_dit` swaps them (a quantized DiT's state dict adds a `scale` next to each `weight`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import QUANT_MODES

_STORAGE = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # dtype, largest magnitude used
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


class QuantLinear(nn.Module):
    """A Linear with a quantized weight [out, in] and a per-output-channel fp32 scale: W ≈ weight · scale."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str) -> QuantLinear:
        """Quantize `linear` symmetrically per output channel (absmax → the storage type's largest value)."""
        storage, top = _STORAGE[mode]
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / top).clamp_min(torch.finfo(torch.float32).tiny)
        q = (w / scale).clamp(-top, top)
        q = (q.round() if mode == "int8" else q).to(storage)  # fp8: the cast rounds to nearest
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(q, scale, bias)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


def quantize_dit(dit: nn.Module, mode: str = "none") -> nn.Module:
    """Swap every block's attention and FFN linears for `QuantLinear`s in place (mode "none": unchanged).
    Cast the DiT to its dtype first: `.to(dtype)` afterwards would also convert the fp8 weights."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(QUANT_MODES)}")
    if mode == "none":
        return dit
    for block in dit.blocks:
        for path in BLOCK_LINEARS:
            parent_path, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = parent.get_submodule(leaf)
            if isinstance(linear, nn.Linear):
                parent.register_module(leaf, QuantLinear.from_linear(linear, mode))
    return dit


__all__ = ["QUANT_MODES", "QuantLinear", "quantize_dit"]
