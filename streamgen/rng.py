"""Counter-based random draws: a draw is a pure function of its key, never of call order or process."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def keyed_randn(shape: tuple[int, ...], *key: object) -> Tensor:
    """Standard normal float32 tensor determined by `key` alone (CPU generator: same on every machine)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen)
