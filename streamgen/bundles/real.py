"""Build a `ModelBundle` for a real Wan2.1 family from a local model dir, or at real dims with random weights.

`load_family("longlive", "/models/wan")` checks the dir first (`check.check_model_dir`: every file,
key and shape, headers only), so a missing or wrong file fails before any weight is read. Then:

- DiT: the family's checkpoint envelope (memory-mapped, so the unused `critic` / non-EMA copies in the
  same file are never read), keys normalized, LoRA merged (W + alpha/r·B·A), built on the meta device
  and the tensors assigned (no second copy), cast to `dtype` on `device` (the time embedding and
  modulation to fp32: `dit.keeps_fp32`).
- Text: umT5-xxl encoder + the local `google/umt5-xxl` tokenizer (`tokenizers` package), contexts
  cached per prompt and delivered on the DiT's device and dtype.
- Frames: the Wan2.1 VAE streaming decoder (exact) or TAEHV (fast), one fresh decoder per stream.
- Stream settings: the family's `StreamConfig` (policy, sampler, steps, shift, ...) at the chosen size.

Precision: bf16 weights and activations on a GPU, fp32 on the CPU, unless `dtype` says otherwise
(spec §a.5: the reference runs everything in bf16; RoPE and the x̂0 conversion stay float64).
Quantization and compiling come after loading (`bundle.load_bundle` → `bundle.prepare_dit`).
"""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.checkpoint import (
    check_state_dict,
    load_lora,
    merge_lora,
    normalize_state,
    pick_envelope,
)
from ..models.config import DiTConfig
from ..models.decoders import (
    FrameDecoder,
    LatentPreviewDecoder,
    TAEHVFrames,
    WanVAEFrames,
)
from ..models.dit import WanDiT, keeps_fp32
from ..models.random_text import RandomTextEncoder
from ..models.rope import Rope3D
from .bundle import ModelBundle, resolve_dtype
from .check import (
    ModelDirError,
    check_model_dir,
    expected_dit_shapes,
    taehv_config,
    vae_kwargs,
)
from .family import BUNDLE_DECODERS, FamilySpec, load_family_config


class ContextOnDevice:
    """A prompt encoder whose contexts arrive on the DiT's device and dtype ([1, text_len, text_dim])."""

    def __init__(self, inner: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.inner, self.device, self.dtype = inner, device, dtype

    def encode(self, prompt: str) -> Tensor:
        return self.inner.encode(prompt).to(device=self.device, dtype=self.dtype)


def load_family(
    name: str | Path | FamilySpec,
    model_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    decoder: str = "vae",
    random_weights: bool = False,
    size: str | tuple[int, int] | None = None,
    *,
    seed: int = 0,
    text_dtype: torch.dtype | None = None,
    architecture: DiTConfig | None = None,
) -> ModelBundle:
    """The family's DiT (+ LoRA), umT5 prompt encoder, frame decoder and StreamConfig as a `ModelBundle`.

    name: registry name (`streamgen/configs/models/<name>.yaml`), a YAML path or a `FamilySpec`.
    model_dir: the local folder with the family's files (see `streamgen models show NAME`); checked
        before anything is loaded — every problem is listed in one `ModelDirError`.
    device / dtype: dtype defaults to bf16 on CUDA and fp32 on the CPU; `text_dtype` (default `dtype`)
        for the 5.7 B-parameter umT5 (fp32 on the CPU takes ~23 GB; pass torch.bfloat16 to halve it).
    decoder: "vae" (Wan2.1 VAE, exact streaming decode), "taehv" (taew2_1.pth, fast) or "preview"
        (a fixed latent→RGB projection, no file).
    size: video size "WIDTHxHEIGHT" in pixels (default: the family's, 832x480 → 60×104 latents).
    random_weights: build the full architecture with random weights and read NO files (the benchmark
        target): the DiT at the YAML's dims (or `architecture`), a `RandomTextEncoder(text_len=512,
        text_dim=4096)` STAND-IN instead of umT5 (each word a fixed random row; no tokenizer, no 5.7 B
        encoder), and the VAE / TAEHV at their real dims with random weights. Pictures are meaningless.
    """
    spec = load_family_config(name)
    spec.require_streamable("be loaded to stream")
    device = torch.device(device)
    dtype = dtype or resolve_dtype("auto", device)
    if decoder not in BUNDLE_DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; known: {', '.join(BUNDLE_DECODERS)}")
    cfg = architecture or spec.dit_config()
    stream = spec.stream_config(spec.latent_size(size), dtype=dtype)
    if random_weights:
        if model_dir is not None:
            raise ValueError("random_weights=True reads no files: drop model_dir")
        torch.manual_seed(seed)
        dit = _random_dit(cfg, device, dtype)
        text = ContextOnDevice(RandomTextEncoder(cfg.text_len, cfg.text_dim, seed), device, dtype)
        frames = _random_decoder(spec, decoder, cfg, device, dtype)
        what = "random weights, RandomTextEncoder stand-in"
    else:
        if model_dir is None:
            raise ValueError(f"loading {spec.name} needs model_dir (or random_weights=True)")
        if architecture is not None and architecture != spec.dit_config():
            raise ValueError("a reduced architecture needs random_weights=True (the checkpoint has the family's dims)")
        report = check_model_dir(spec, model_dir, decoder=decoder)
        if not report.ok:
            raise ModelDirError(f"cannot load {spec.name} from {model_dir}:\n{report.render()}")
        found = {f.role: f.path for f in report.files}
        dit = load_dit(spec, found["dit"], found.get("lora"), device, dtype)
        text = ContextOnDevice(_load_text_encoder(spec, found["text_encoder"], found["tokenizer"], device,
                                                  text_dtype or dtype), device, dtype)
        frames = _load_decoder(spec, decoder, found, cfg, device, dtype)
        what = f"weights from {Path(model_dir)}"
    return ModelBundle(name=spec.name, dit=dit, text_encoder=text, decoder=frames, stream=stream,
                       fps=spec.video.fps, description=f"{spec.title}: {spec.description} ({what}; {dtype} on {device})")


# ------------------------------------------------------------------------------------------- DiT
def _finish_dit(dit: WanDiT) -> WanDiT:
    # The RoPE table is a plain attribute (float64, CPU): rebuild it outside any meta/cuda device context.
    cfg = dit.cfg
    dit.rope = Rope3D(cfg.head_dim, cfg.rope_theta, cfg.rope_max_frames)
    return dit.eval().requires_grad_(False)


def _random_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype) -> WanDiT:
    with torch.device(device):
        dit = WanDiT(cfg)
    return _finish_dit(dit.cast(dtype))


def read_weights(path: Path) -> Any:
    """Read a checkpoint for loading: safetensors as is; zip pickles memory-mapped (only the tensors used
    are paged in), legacy pickles fully. weights_only: no pickled code runs."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def load_dit(spec: FamilySpec, path: Path, lora_path: Path | None, device: torch.device | str,
             dtype: torch.dtype) -> WanDiT:
    """The family's DiT with its checkpoint (envelope from the YAML) and LoRA merged, on `device` in `dtype`."""
    cfg = spec.dit_config()
    state, _ = pick_envelope(read_weights(path), spec.files.dit.envelope, str(path))
    state = normalize_state(state, str(path))
    if lora_path is not None and spec.files.lora is not None:
        obj = read_weights(lora_path)
        adapter = obj.get(spec.files.lora.key, obj) if isinstance(obj, dict) else obj
        state = merge_lora(state, load_lora(adapter), alpha=spec.files.lora.alpha)
    check_state_dict(state, expected_dit_shapes(cfg))
    state = {k: v.to(device=device, dtype=torch.float32 if keeps_fp32(k) else dtype) if v.is_floating_point()
             else v.to(device) for k, v in state.items()}
    with torch.device("meta"):
        dit = WanDiT(cfg)
    dit.load_state_dict(state, strict=True, assign=True)
    return _finish_dit(dit)


# ------------------------------------------------------------------------------------------ text
def _load_text_encoder(spec: FamilySpec, weights: Path, tokenizer_dir: Path, device: torch.device,
                       dtype: torch.dtype):
    from ..models.umt5 import (
        UMT5Config,
        UMT5Encoder,
        UMT5PromptEncoder,
        UMT5Tokenizer,
        load_umt5_weights,
    )

    text_len = spec.architecture.text_len
    tokenizer = UMT5Tokenizer.from_dir(tokenizer_dir, text_len=text_len)  # fails early if `tokenizers` is missing
    with torch.device("meta"):
        encoder = UMT5Encoder(UMT5Config(**spec.files.text_encoder.config))
    load_umt5_weights(weights, encoder, dtype=dtype)
    encoder = encoder.to(device).eval().requires_grad_(False)
    return UMT5PromptEncoder(tokenizer, encoder, text_len=text_len)


# -------------------------------------------------------------------------------------- decoders
def _decoder_factory(kind: str, model: Any, channels: int) -> Callable[[], FrameDecoder]:
    if kind == "vae":
        return lambda: WanVAEFrames(model)
    if kind == "taehv":
        return lambda: TAEHVFrames(model)
    return lambda: LatentPreviewDecoder(channels, scale=8)


def _random_decoder(spec: FamilySpec, kind: str, cfg: DiTConfig, device: torch.device,
                    dtype: torch.dtype) -> Callable[[], FrameDecoder]:
    model: Any = None
    if kind == "vae":
        from ..models.wan_vae import WanVAE

        with torch.device(device):
            model = WanVAE(**vae_kwargs(spec.files.vae.config))
    elif kind == "taehv":
        from ..models.taehv import TAEHV

        with torch.device(device):
            model = TAEHV(taehv_config(spec.files.taehv.config if spec.files.taehv else {}))
    if model is not None:
        model = model.to(dtype).eval().requires_grad_(False)
    return _decoder_factory(kind, model, cfg.in_dim)


def random_decoder(spec: FamilySpec, kind: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Callable[[], FrameDecoder]:
    """A random-weight decoder at the family's real widths (benchmarks: its cost, not its picture)."""
    cfg = spec.dit_config()
    return _random_decoder(spec, kind, cfg, torch.device(device), dtype)


def _load_decoder(spec: FamilySpec, kind: str, found: dict[str, Path | None], cfg: DiTConfig,
                  device: torch.device, dtype: torch.dtype) -> Callable[[], FrameDecoder]:
    model: Any = None
    if kind == "vae":
        from ..models.wan_vae import load_wan_vae

        model = load_wan_vae(found["vae"], spec.files.vae.config)
    elif kind == "taehv":
        from ..models.taehv import TAEHV

        assert spec.files.taehv is not None
        model = TAEHV.from_checkpoint(found["taehv"], taehv_config(spec.files.taehv.config))
    if model is not None:
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return _decoder_factory(kind, model, cfg.in_dim)


__all__ = ["load_family", "load_dit", "read_weights", "ContextOnDevice"]
