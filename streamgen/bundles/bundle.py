"""A servable model: DiT + text encoder + frame decoder + the stream settings it was trained with.

`load_bundle(name)` is the one place servers, render jobs and benchmarks get a model from; a
`BundleSpec` (name, model dir, dtype, quantization, compile mode) says how, small enough to send to
Ray actors, which load the same bundle themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from ..engine.driven import AudioDriven
from ..engine.prompts import PromptEncoder
from ..engine.stream import StreamConfig
from ..models.config import DiTConfig
from ..models.decoders import FrameDecoder, LatentPreviewDecoder
from ..models.dit import WanDiT
from ..models.precision import COMPILE_MODES, DTYPE_CHOICES, QUANT_MODES
from ..models.quant import quantize_dit
from ..models.random_text import RandomTextEncoder
from .builtins import BUILTINS, DEFAULT_MODEL
from .family import BUNDLE_DECODERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BundleSpec:
    """How to load a bundle: what Ray actors get instead of weights. `dtype` "auto" is bf16 on CUDA and
    fp32 on the CPU; `load_bundle` records the dtype it resolved, so actors run what the driver runs.
    `decoder` None: the model's own (a family's Wan VAE; a built-in's pixel or preview decoder)."""

    name: str
    model_dir: str | None = None
    dtype: str = "auto"
    quant: str = "none"
    compile: str = "none"  # none | inductor | cuda-graphs
    decoder: str | None = None  # vae | taehv | preview, for model families

    def __post_init__(self) -> None:
        for what, value, known in (("dtype", self.dtype, DTYPE_CHOICES), ("quantization", self.quant, QUANT_MODES),
                                   ("compile mode", self.compile, COMPILE_MODES),
                                   ("decoder", self.decoder or BUNDLE_DECODERS[0], BUNDLE_DECODERS)):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")

    def load(self) -> ModelBundle:
        return load_bundle(self.name, self.model_dir, dtype=self.dtype, quant=self.quant, compile=self.compile,
                           decoder=self.decoder)


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
    spec: BundleSpec | None = None  # set by `load_bundle`: how to load this bundle again (Ray actors)
    avatar: AudioDriven | None = None  # an audio-driven model: how audio and a reference picture drive it


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
        stream=BUILTINS["tiny-random"].stream_config(),
        fps=16.0,
        description="random-weight 2-layer Wan DiT, latent preview decoder (machinery only)",
    )


def embedded() -> ModelBundle:
    """The in-repo model trained on the procedural world (streamgen/bundles/embedded.py)."""
    from .embedded import embedded_bundle  # lazy: embedded.py builds on this module

    return embedded_bundle()


def embedded_avatar() -> ModelBundle:
    """The in-repo audio-driven avatar trained on the avatar world (streamgen/bundles/embedded_avatar.py)."""
    from .embedded_avatar import embedded_avatar_bundle

    return embedded_avatar_bundle()


BUNDLES: dict[str, Callable[[], ModelBundle]] = {"tiny-random": tiny_random, "embedded": embedded,
                                                 "embedded-avatar": embedded_avatar}  # BUILTINS' order


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype name as a torch dtype; "auto": bf16 on CUDA (as the reference pipelines), fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def require_cuda_for(compile: str) -> None:
    """CUDA graphs need a GPU: refuse before anything is loaded or built."""
    if compile == "cuda-graphs" and not torch.cuda.is_available():
        raise ValueError("--cuda-graphs captures the DiT call in a CUDA graph and needs a CUDA GPU; torch sees "
                         "none here (torch.cuda.is_available() is False). Drop --cuda-graphs (--compile works on the CPU)")


def _own_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output.clone()


def prepare_dit(dit: WanDiT, dtype: torch.dtype, quant: str = "none", compile: str = "none") -> WanDiT:
    """Cast (fp32 parts kept, see `WanDiT.cast`), quantize the block linears, then compile — in that order:
    quantize what runs in `dtype`, compile what runs. Compiling is lazy: each call shape compiles on first use.

    compile "inductor": torch.compile of the forward (cache policies run eagerly between the compiled
    parts); "cuda-graphs": mode "reduce-overhead", each DiT call replays CUDA graphs. A replay overwrites
    the previous call's output, and timestep-slot runs several calls before using their outputs, so
    each call hands out a copy of its output (one latent-sized copy)."""
    require_cuda_for(compile)
    quantize_dit(dit.cast(dtype), quant)
    if compile != "none":
        dit.forward = torch.compile(dit.forward, mode="reduce-overhead" if compile == "cuda-graphs" else None)
    if compile == "cuda-graphs":
        dit.register_forward_hook(_own_output)  # runs outside the compiled forward
    return dit


def load_bundle(name: str = DEFAULT_MODEL, model_dir: str | None = None, *, dtype: str = "auto", quant: str = "none",
                compile: str = "none", decoder: str | None = None) -> ModelBundle:
    """A built-in bundle by name, or a real model family (streamgen/configs/models/NAME.yaml, or a YAML path) from
    `model_dir`; a family's files are checked (names, keys, shapes) before anything is loaded.

    dtype / quant / compile: see `BundleSpec` and `prepare_dit`; built-in bundles stay on the CPU, families
    load on CUDA when there is one. decoder: a family's frame decoder ("vae" exact, "taehv" real-time,
    "preview" untrained; default vae); built-ins have their own. The returned bundle's `spec` records what
    was resolved."""
    spec = BundleSpec(name, None if model_dir is None else str(model_dir), dtype, quant, compile, decoder)
    require_cuda_for(compile)
    if name in BUNDLES and model_dir is None:
        if decoder is not None:
            raise ValueError(f"model {name!r} is built in and decodes with its own decoder; --decoder "
                             f"({', '.join(BUNDLE_DECODERS)}) chooses the decoder of a model family")
        bundle = BUNDLES[name]()
        torch_dtype = resolve_dtype(dtype, next(bundle.dit.parameters()).device)
        bundle.stream = replace(bundle.stream, dtype=torch_dtype)
    else:
        from .family import family_files

        families = family_files()
        if name not in families and not name.endswith((".yaml", ".yml")):
            raise ValueError(f"unknown model {name!r}; built in: {', '.join(sorted(BUNDLES))}; "
                             f"families (need --model-dir): {', '.join(sorted(families))}")
        if model_dir is None:
            raise ValueError(f"model family {name!r} needs --model-dir DIR (a local download; see `streamgen models show {name}`)")
        from .real import load_family

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = resolve_dtype(dtype, device)
        bundle = load_family(name, model_dir, device=device, dtype=torch_dtype, decoder=decoder or BUNDLE_DECODERS[0])
    prepare_dit(bundle.dit, torch_dtype, quant, compile)
    bundle.spec = replace(spec, dtype=dtype_name(torch_dtype))
    return bundle
