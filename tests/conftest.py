"""Shared test fixtures: the tiny DiT of the golden fixtures and a text encoder for it."""
from __future__ import annotations

from pathlib import Path

import pytest

from streamgen.models.dit import WanDiT
from streamgen.models.random_text import RandomTextEncoder
from streamgen.parity.common import Fixture

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def tiny_model() -> WanDiT:
    """The re-randomised 2-layer Wan DiT the golden fixtures were made with (8×8 latents → 16 tokens/frame)."""
    return Fixture.open(FIXTURES / "dit").build_model()


@pytest.fixture(scope="session")
def text_encoder() -> RandomTextEncoder:
    return RandomTextEncoder(text_len=16, text_dim=32)
