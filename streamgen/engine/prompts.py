"""Prompt conditioning of a stream: text → embedding (cached per prompt) → cross-attention K/V, and
how a change lands at a chunk boundary: LongLive's KV re-cache (spec §d) or a soft blend of
embeddings over N chunks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from ..errors import InputError
from ..lru import LRU


class PromptEncoder(Protocol):
    """Turns prompt text into the DiT's context [1, text_len, text_dim] (padding rows zero).

    An encoder may also offer `describe(prompt) -> dict` (e.g. words it ignored), which the stream puts
    in the prompt's acknowledgement, and `vocabulary() -> dict[str, list[str]]` (the words it knows, for
    encoders with a closed vocabulary), which the web page shows beside the prompt box."""

    def encode(self, prompt: str) -> Tensor: ...


def describe_prompt(encoder: PromptEncoder, prompt: object) -> dict[str, Any]:
    """How `encoder` understood `prompt` ({} when it cannot say, or the prompt is not text); with a
    `warning` line when it ignored words, which render, the client and the page show as it is."""
    describe = getattr(encoder, "describe", None)
    if describe is None or not isinstance(prompt, str):
        return {}
    detail = describe(prompt)
    if (warning := ignored_words_warning(detail, prompt)) is not None:
        detail = {**detail, "warning": warning}
    return detail


def ignored_words_warning(detail: dict[str, Any], prompt: str) -> str | None:
    """The one-line warning for a prompt some of whose words the model ignored (None when it used them all)."""
    unknown = detail.get("unknown_words") or []
    if not unknown:
        return None
    understood = f"; understood as {detail['understood']!r}" if detail.get("understood") else ""
    return f"prompt {prompt!r}: the model ignores {', '.join(map(repr, unknown))}{understood}"


def prompt_vocabulary(encoder: PromptEncoder) -> dict[str, list[str]] | None:
    """The encoder's closed vocabulary by attribute, or None for an open-vocabulary encoder (umT5)."""
    vocabulary = getattr(encoder, "vocabulary", None)
    return vocabulary() if vocabulary is not None else None


@dataclass(frozen=True)
class Transition:
    """How a prompt change lands: "recache" (re-encode cached K/V under the new prompt, spec §d) or
    "blend" (interpolate embeddings over `chunks` chunks, linear or slerp; the cache is kept)."""

    kind: Literal["recache", "blend"] = "recache"
    chunks: int = 1
    interpolation: Literal["linear", "slerp"] = "linear"

    def __post_init__(self) -> None:
        if self.kind not in ("recache", "blend"):
            raise InputError(f"unknown transition {self.kind!r}; known: recache, blend")
        if self.interpolation not in ("linear", "slerp"):
            raise InputError(f"unknown interpolation {self.interpolation!r}; known: linear, slerp")
        if self.chunks < 1:
            raise InputError(f"a transition spans at least 1 chunk, got {self.chunks}")


def interpolate(a: Tensor, b: Tensor, w: float, kind: str) -> Tensor:
    """Blend two contexts row by row; slerp keeps norms on the arc, zero rows fall back to linear."""
    if kind == "linear":
        return torch.lerp(a, b, w)
    af, bf = a.double(), b.double()
    na, nb = af.norm(dim=-1, keepdim=True), bf.norm(dim=-1, keepdim=True)
    cos = ((af * bf).sum(-1, keepdim=True) / (na * nb).clamp_min(1e-12)).clamp(-1, 1)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    safe = (so.abs() > 1e-6) & (na > 0) & (nb > 0)
    slerp = (torch.sin((1 - w) * omega) * af + torch.sin(w * omega) * bf) / torch.where(safe, so, torch.ones_like(so))
    return torch.where(safe, slerp, torch.lerp(af, bf, w)).to(a.dtype)


class EmbeddingCache:
    """LRU of prompt embeddings, so a prompt that comes back is not re-encoded."""

    def __init__(self, encoder: PromptEncoder, size: int = 64) -> None:
        self.encoder = encoder
        self.memo: LRU[Tensor] = LRU(size)

    def __call__(self, prompt: str | Tensor) -> Tensor:
        if isinstance(prompt, Tensor):
            return prompt
        return self.memo.get(prompt, lambda: self.encoder.encode(prompt))


@dataclass
class ChunkPrompt:
    """The conditioning a chunk is generated with. `recache_id` changes only on a re-cache transition."""

    context: Tensor
    context_id: int
    recache_id: int


class PromptTimeline:
    """Which context each chunk uses; a pending change is applied when the next chunk starts."""

    def __init__(self, context: Tensor) -> None:
        self.context = context
        self.context_id = 0  # bumped whenever `context` changes
        self.recache_id = 0
        self.blend: tuple[Tensor, Tensor, Transition, int] | None = None  # (from, to, transition, first chunk)

    def change(self, target: Tensor, transition: Transition, chunk: int) -> None:
        if transition.kind == "recache":
            self.context, self.blend = target, None
            self.context_id += 1
            self.recache_id += 1
        else:
            self.blend = (self.context, target, transition, chunk)

    def for_chunk(self, chunk: int) -> ChunkPrompt:
        if self.blend is not None:
            start, target, tr, first = self.blend
            w = min(1.0, (chunk - first + 1) / tr.chunks)
            self.context = target if w >= 1.0 else interpolate(start, target, w, tr.interpolation)
            self.context_id += 1
            if w >= 1.0:
                self.blend = None
        return ChunkPrompt(self.context, self.context_id, self.recache_id)
