"""Wan's umT5-xxl text encoder (spec §a.6, §h item 7): tokenizer seam, encoder, DiT context.

Design choice: an own ``nn.Module`` rather than ``transformers.UMT5EncoderModel`` plus a key map.
The encoder is ~150 lines, loads ``models_t5_umt5-xxl-enc-bf16.pth`` by its real key names with no
renaming, and keeps ``transformers`` out of the dependencies.

Architecture (T5 encoder, umT5 flavour): token embedding; per layer, pre-norm
``x += Attn(norm1(x))`` and ``x += FFN(norm2(x))``; final norm. Attention has NO 1/sqrt(d) scaling
and a per-layer (``shared_pos=False``) bidirectional relative-position bias; keys with mask 0 get
``finfo.min``. FFN = ``fc2(fc1(x) * gelu_tanh(gate(x)))``. Norms are T5 RMS norms (no mean
subtraction, no bias) computed in fp32. All sizes come from ``UMT5Config``.

The DiT receives ``context_from_hidden(hidden, mask)``: the encoder output with every row at or
beyond ``mask.sum()`` (real tokens incl. EOS) set to exactly 0.
"""
from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lru import LRU
from .checkpoint import CheckpointError, check_state_dict, read_tensors
from .config import UMT5Config


# ------------------------------------------------------------------------------------------- modules
class T5LayerNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32, no mean subtraction and no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.type_as(self.weight)
        return self.weight * y


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_dist: int,
                              device: torch.device | None = None) -> Tensor:
    """Bidirectional T5 bucket index [q_len, k_len] for relative position (key - query).

    Half the buckets per direction (keys after the query get the upper half); within a half,
    distances below half/2 are exact, larger ones log-spaced up to ``max_dist``, then clipped.
    """
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    max_exact = half // 2
    # The op order (fp32 log, python-float divide, scale, truncate) fixes which bucket a boundary
    # distance lands in; keep it. clamp(min=max_exact) only avoids log(0) in the unused branch.
    log_part = torch.log(dist.clamp(min=max_exact).float() / max_exact) / math.log(max_dist / max_exact)
    large = (max_exact + (log_part * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(dist < max_exact, dist, large)


class T5RelativeEmbedding(nn.Module):
    """Learned per-head bias per bucket; returns [1, heads, q_len, k_len]."""

    def __init__(self, num_buckets: int, num_heads: int, max_dist: int) -> None:
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        idx = relative_position_buckets(q_len, k_len, self.num_buckets, self.max_dist, self.embedding.weight.device)
        return self.embedding(idx).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None, pos_bias: Tensor | None) -> Tensor:
        b, n, c = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, c)
        k = self.k(x).view(b, -1, n, c)
        v = self.v(x).view(b, -1, n, c)
        bias = x.new_zeros(b, n, q.size(1), k.size(1))
        if pos_bias is not None:
            bias = bias + pos_bias
        if mask is not None:
            keep = mask.view(b, 1, 1, -1) if mask.ndim == 2 else mask.unsqueeze(1)
            bias = bias.masked_fill(keep == 0, torch.finfo(x.dtype).min)
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias  # T5: no 1/sqrt(head_dim)
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, n * c)
        return self.o(out)


class T5FeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); ``gate`` is a Sequential so its key is ``gate.0.weight``."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: Tensor) -> Tensor:
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = (None if cfg.shared_pos
                              else T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.relative_max_dist))

    def forward(self, x: Tensor, mask: Tensor | None, pos_bias: Tensor | None = None) -> Tensor:
        if self.pos_embedding is not None:
            pos_bias = self.pos_embedding(x.size(1), x.size(1))
        x = _fp16_clamp(x + self.attn(self.norm1(x), mask, pos_bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder; ``forward(ids [B, L] int64, mask [B, L]) -> hidden [B, L, dim]``."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = (T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.relative_max_dist)
                              if cfg.shared_pos else None)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.encoder_layers))
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict(keep_vars=True).items()}

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.token_embedding(ids)
        pos_bias = self.pos_embedding(x.size(1), x.size(1)) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, mask, pos_bias)
        return self.norm(x)


def load_umt5_weights(path: str | Path, model: UMT5Encoder, dtype: torch.dtype | None = None) -> UMT5Encoder:
    """Load a Wan umT5 state dict (``.pth`` read with weights_only, or ``.safetensors``) into ``model``.

    Every missing / unexpected / mis-shaped key is named in one ``CheckpointError``. A model built on
    the meta device gets the tensors assigned (no second copy of the 5.7 B weights); otherwise they
    are copied into the existing parameters. ``dtype`` casts floating tensors first.
    """
    state = read_tensors(path)
    non_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if non_tensors:
        raise CheckpointError(f"{path}: not a flat umT5 state dict; non-tensor entries: {', '.join(non_tensors[:20])}")
    check_state_dict(state, model.expected_shapes())
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def context_from_hidden(hidden: Tensor, mask: Tensor) -> Tensor:
    """The DiT context: ``hidden`` with rows at positions >= mask.sum(-1) set to exactly 0."""
    lengths = mask.sum(dim=-1).to(hidden.device)
    keep = torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]
    return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


# ----------------------------------------------------------------------------------------- tokenizer
def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: ftfy fix (if ftfy is installed), HTML-unescape twice, strip,
    then collapse every whitespace run to one space."""
    try:
        import ftfy  # optional
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """Tokenizer seam: clean, encode pieces, truncate, append EOS, pad to ``text_len``.

    ``encode_fn`` maps a cleaned string to ids WITHOUT special tokens. The result equals HF's
    ``tokenizer(..., padding='max_length', truncation=True, max_length=text_len,
    add_special_tokens=True)``: at most text_len - 1 pieces, then EOS, then pad; mask 1 on pieces+EOS.
    """

    def __init__(self, encode_fn: Callable[[str], list[int]], text_len: int = 512, pad_id: int = 0,
                 eos_id: int = 1, clean: bool = True) -> None:
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.encode_fn, self.text_len, self.pad_id, self.eos_id, self.clean = encode_fn, text_len, pad_id, eos_id, clean

    @classmethod
    def from_dir(cls, path: str | Path, text_len: int = 512, clean: bool = True) -> "UMT5Tokenizer":
        """Load a local ``google/umt5-xxl`` tokenizer (its ``tokenizer.json``); nothing is downloaded.

        Needs the optional ``tokenizers`` package (``pip install tokenizers``).
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"umT5 tokenizer not found: expected {file} (a local copy of the google/umt5-xxl tokenizer "
                "directory with tokenizer.json; nothing is downloaded at run time)")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError(
                f"loading the umT5 tokenizer from {file} needs the optional package 'tokenizers' "
                "(pip install tokenizers)") from exc
        tok = Tokenizer.from_file(str(file))
        pad_id, eos_id = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
        return cls(lambda s: tok.encode(s, add_special_tokens=False).ids, text_len=text_len,
                   pad_id=0 if pad_id is None else pad_id, eos_id=1 if eos_id is None else eos_id, clean=clean)

    def __call__(self, prompts: Sequence[str], text_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Return ``ids``, ``mask`` as int64 [len(prompts), text_len]."""
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.text_len if text_len is None else text_len
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), length), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            pieces = list(self.encode_fn(clean_prompt(prompt) if self.clean else prompt))[: length - 1]
            seq = pieces + [self.eos_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return ids, mask


# ------------------------------------------------------------------------------------ prompt encoder
class UMT5PromptEncoder:
    """Owns tokenizer + encoder; ``encode(prompts) -> context [B, text_len, dim]`` for the DiT.

    Embeddings are cached per prompt string (LRU, ``cache_size`` entries), so re-sending a prompt
    during a stream costs nothing; the DiT's cross-attention K/V cache is separate (spec §h.7).
    """

    def __init__(self, tokenizer: Callable[..., tuple[Tensor, Tensor]], encoder: UMT5Encoder,
                 text_len: int = 512, cache_size: int = 16) -> None:
        self.tokenizer, self.encoder, self.text_len, self.cache_size = tokenizer, encoder, text_len, cache_size
        self._cache: LRU[Tensor] = LRU(cache_size)  # locked: sessions' control threads share it

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        fresh = self._encode(missing) if missing else {}
        return torch.stack([self._cache.get(p, lambda p=p: fresh[p] if p in fresh else self._encode([p])[p]) for p in prompts])

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        param = next(self.encoder.parameters())
        ids, mask = self.tokenizer(prompts, text_len=self.text_len)
        ids, mask = ids.to(param.device), mask.to(param.device)
        return dict(zip(prompts, context_from_hidden(self.encoder(ids, mask), mask)))
