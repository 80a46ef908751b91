"""A stand-in text encoder for random-weight DiTs (benchmarks, tests of the machinery): each word maps
to a fixed pseudo-random row, so different prompts give different, repeatable contexts. Real models use
umT5 (streamgen.models.umt5); the embedded model has its own vocabulary encoder."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rng import keyed_randn


class RandomTextEncoder:
    """Context [1, text_len, text_dim]: one row per word (at most text_len), padding rows exactly 0."""

    def __init__(self, text_len: int, text_dim: int, seed: int = 0) -> None:
        self.text_len, self.text_dim, self.seed = text_len, text_dim, seed

    def encode(self, prompt: str) -> Tensor:
        words = prompt.lower().split()
        if len(words) > self.text_len:
            raise ValueError(f"prompt has {len(words)} words; this encoder takes at most {self.text_len}")
        out = torch.zeros(1, self.text_len, self.text_dim)
        for i, word in enumerate(words):
            out[0, i] = keyed_randn((self.text_dim,), self.seed, word)
        return out
