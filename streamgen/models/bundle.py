"""A servable model: DiT + text encoder + frame decoder + the stream settings it was trained with.

`load_bundle(name)` is the one place servers, render jobs and benchmarks get a model from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..engine.prompts import PromptEncoder
from ..engine.stream import StreamConfig
from .config import DiTConfig
from .decoders import FrameDecoder, LatentPreviewDecoder
from .dit import WanDiT
from .random_text import RandomTextEncoder


@dataclass
class ModelBundle:
    """Everything a stream of this model needs; `decoder()` makes a fresh per-stream decoder."""

    name: str
    dit: WanDiT
    text_encoder: PromptEncoder
    decoder: Callable[[], FrameDecoder]
    stream: StreamConfig
    fps: float
    description: str = ""
    example_prompt: str = "a calm lake at dawn"  # what a session starts with when nobody names a prompt


def tiny_random(seed: int = 0) -> ModelBundle:
    """A 2-layer Wan DiT with random weights (32×32 preview): exercises every part of the machinery,
    shows no meaningful picture. Replaced as the default by the embedded trained model."""
    torch.manual_seed(seed)
    cfg = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, text_len=16)
    dit = WanDiT(cfg).eval()
    return ModelBundle(
        name="tiny-random",
        dit=dit,
        text_encoder=RandomTextEncoder(cfg.text_len, cfg.text_dim),
        decoder=lambda: LatentPreviewDecoder(cfg.in_dim, scale=4),
        stream=StreamConfig(8, 8, policy="ema_sink"),
        fps=16.0,
        description="random-weight 2-layer Wan DiT, latent preview decoder (machinery only)",
    )


def embedded() -> ModelBundle:
    """The in-repo model trained on the procedural world (streamgen/models/embedded.py)."""
    from .embedded import embedded_bundle  # lazy: embedded.py builds on this module

    return embedded_bundle()


BUNDLES: dict[str, Callable[[], ModelBundle]] = {"tiny-random": tiny_random, "embedded": embedded}
DEFAULT_MODEL = "embedded"


def load_bundle(name: str = DEFAULT_MODEL, model_dir: str | None = None) -> ModelBundle:
    """A built-in bundle by name, or a real model family (configs/models/NAME.yaml) from `model_dir`;
    a family's files are checked (names, keys, shapes) before anything is loaded."""
    if name in BUNDLES and model_dir is None:
        return BUNDLES[name]()
    from .registry import family_files

    families = family_files()
    if name not in families:
        raise ValueError(f"unknown model {name!r}; built in: {', '.join(sorted(BUNDLES))}; "
                         f"families (need --model-dir): {', '.join(sorted(families))}")
    if model_dir is None:
        raise ValueError(f"model family {name!r} needs --model-dir DIR (a local download; see `streamgen models show {name}`)")
    from .real import load_family

    return load_family(name, model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
