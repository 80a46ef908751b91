"""Model registry: one YAML per model family (`streamgen/configs/models/<name>.yaml`), validated with pydantic,
and `streamgen models list | show NAME | check DIR [--family NAME]`.

Config, not code, selects a family: a YAML carries the DiT architecture, the video geometry, the
stream settings of spec §b.7 (cache policy and its settings, sampler, steps, warping, shift, chunk)
and the files a model dir must hold (paths relative to the dir, the checkpoint envelope, the LoRA).
Adding a family is adding a YAML; `streamgen.bundles.real.load_family` builds a `ModelBundle` from it.

Where the YAMLs live: ONE copy, package data in ``streamgen/configs/models/`` (so a wheel install has
them), or ``$STREAMGEN_CONFIGS/models`` when that variable is set (private families).

YAML schema (``FamilySpec``; unknown keys are errors, every error names the file and the field)::

    name: longlive                 # = the file stem
    title: LongLive                # for messages ("LongLive needs models/lora.pt")
    kind: family | base            # base: a family-less architecture name (wan2.1-t2v-1.3b)
    description: ...
    reference: "owner/repo @ commit (files)"
    architecture: {dim, ffn_dim, freq_dim, text_dim, text_len, num_heads, num_layers, in_dim, out_dim,
                   patch_size, eps, qk_norm, cross_attn_norm, rope_theta, rope_max_frames}   # DiTConfig
    video: {width, height, latent_height, latent_width, vae_stride: [4, 8, 8], fps}
    stream: {policy, policy_settings: {...}, sampler, schedule, steps, warp_steps, shift, context_noise,
             chunk_frames, transition: {kind, chunks, interpolation}}                     # StreamConfig
    files:                         # path: one relative path or a list of alternatives (first found wins)
      dit: {path, envelope: generator_ema | generator | model | flat (or a preference list), source}
      lora: {path, key: generator_lora, rank, alpha, target_modules: [...], source}      # optional
      text_encoder: {path, config: {UMT5Config fields}, source}
      tokenizer: {path: <dir>, files: [tokenizer.json], source}
      vae: {path, config: {dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample}}
      taehv: {path, optional: true, config: {TAEHVConfig fields}}                       # optional

`check_model_dir` reads only headers: safetensors through ``safe_open`` metadata and torch pickles
with ``torch.load(mmap=True, map_location="meta", weights_only=True)`` (storages are memory-mapped
and mapped to the meta device: no tensor data is read), then compares every key and shape with the
modules built on the meta device from the YAML.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..models.config import DiTConfig
from ..models.precision import DTYPE_CHOICES, QUANT_MODES

if TYPE_CHECKING:
    import torch

# torch, safetensors and the model modules are imported where used: `streamgen --help` and
# `streamgen models list` stay fast (this module is imported when the CLI parser is built).

CONFIG_ENV = "STREAMGEN_CONFIGS"
DEFAULT_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
DECODERS = ("vae", "taehv")
_MAX_LISTED = 20


class FamilyConfigError(ValueError):
    """A family YAML that cannot be found, parsed or validated; the message names the file and field."""


class ModelDirError(ValueError):
    """A model dir that does not hold what its family needs; the message lists every problem."""


# ------------------------------------------------------------------------------------------ schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    """The DiT's shape: every field of `DiTConfig` (spec §a.1 for Wan2.1-T2V-1.3B)."""

    dim: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    freq_dim: int = Field(gt=0)
    text_dim: int = Field(gt=0)
    text_len: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    in_dim: int = Field(gt=0)
    out_dim: int = Field(gt=0)
    patch_size: tuple[int, int, int]
    eps: float = Field(gt=0)
    qk_norm: bool
    cross_attn_norm: bool
    rope_theta: float = 10000.0
    rope_max_frames: int = Field(1024, gt=0)

    @model_validator(mode="after")
    def _dit_config(self) -> "Architecture":
        DiTConfig(**self.model_dump())  # head divisibility, even head_dim, temporal patch 1
        return self

    def dit_config(self, **overrides: Any) -> DiTConfig:
        return DiTConfig(**{**self.model_dump(), **overrides})


class Video(_Strict):
    """Pixel size, latent size (pixels / VAE stride) and frame rate."""

    width: int = Field(gt=0)
    height: int = Field(gt=0)
    latent_height: int = Field(gt=0)
    latent_width: int = Field(gt=0)
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    fps: float = Field(gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "Video":
        _, sh, sw = self.vae_stride
        if (self.latent_height * sh, self.latent_width * sw) != (self.height, self.width):
            raise ValueError(f"latent {self.latent_height}x{self.latent_width} (HxW) times the VAE stride {sh}x{sw} "
                             f"is not the video size {self.height}x{self.width} (HxW)")
        return self


class TransitionSpec(_Strict):
    kind: Literal["recache", "blend"] = "recache"
    chunks: int = Field(1, ge=1)
    interpolation: Literal["linear", "slerp"] = "linear"


class StreamSpec(_Strict):
    """The inference settings the checkpoint was trained with (spec §b.7); fills `StreamConfig`."""

    policy: str
    policy_settings: dict[str, Any] = Field(default_factory=dict)
    sampler: Literal["few_step", "rolling"]
    schedule: Literal["exact", "timestep-slot"] = "exact"
    steps: tuple[float, ...] = Field(min_length=1)
    warp_steps: bool
    shift: float = Field(gt=0)
    context_noise: float = Field(0.0, ge=0)
    chunk_frames: int = Field(3, gt=0)
    transition: TransitionSpec = TransitionSpec()

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < s <= 1000 for s in steps):
            raise ValueError(f"steps must lie in (0, 1000], got {list(steps)}")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must strictly decrease, got {list(steps)}")
        return steps

    @model_validator(mode="after")
    def _warp_needs_integers(self) -> "StreamSpec":
        if self.warp_steps and any(s != int(s) for s in self.steps):
            raise ValueError(f"warped steps index the 1000-entry table: give integers, got {list(self.steps)}")
        return self

    @model_validator(mode="after")
    def _policy_exists(self) -> "StreamSpec":
        try:
            build_policy(self.policy, self.policy_settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"policy {self.policy!r} with policy_settings {self.policy_settings}: {exc}") from None
        return self


class FileSpec(_Strict):
    """A file (or a folder, for the tokenizer) relative to the model dir; a list gives alternatives."""

    path: tuple[str, ...]
    optional: bool = False
    source: str | None = None  # where to get it (Hugging Face repo), for messages

    @field_validator("path", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _relative(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        if not paths:
            raise ValueError("give at least one path")
        for p in paths:
            if not p or Path(p).is_absolute() or ".." in Path(p).parts:
                raise ValueError(f"{p!r}: paths are relative to the model dir (no absolute paths, no '..')")
        return paths

    @property
    def shown(self) -> str:
        return " | ".join(self.path)


class DiTFile(FileSpec):
    """`envelope`: the entry holding the weights (a list: accepted entries in preference order)."""

    envelope: tuple[Literal["generator_ema", "generator", "model", "flat"], ...] = Field(min_length=1)

    @field_validator("envelope", mode="before")
    @classmethod
    def _envelopes(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @property
    def envelope_text(self) -> str:
        return "|".join(self.envelope)


class LoraFile(FileSpec):
    key: str = "generator_lora"  # the adapter's entry in the file; a file without it is a bare adapter
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS  # Linear modules inside every block


class TextEncoderFile(FileSpec):
    config: dict[str, Any]

    @field_validator("config")
    @classmethod
    def _umt5(cls, config: dict[str, Any]) -> dict[str, Any]:
        from ..models.umt5 import UMT5Config

        _known_fields(config, UMT5Config)
        _construct(UMT5Config, config)
        return config


class TokenizerDir(FileSpec):
    files: tuple[str, ...] = ("tokenizer.json",)


class VAEFile(FileSpec):
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("config")
    @classmethod
    def _vae(cls, config: dict[str, Any]) -> dict[str, Any]:
        known = {"dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temporal_downsample", "dropout"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown VAE config keys {unknown}; known: {sorted(known)}")
        return config


class TAEHVFile(FileSpec):
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("config")
    @classmethod
    def _taehv(cls, config: dict[str, Any]) -> dict[str, Any]:
        from ..models.taehv import TAEHVConfig

        _known_fields(config, TAEHVConfig)
        _construct(TAEHVConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        return config


class Files(_Strict):
    dit: DiTFile
    lora: LoraFile | None = None
    text_encoder: TextEncoderFile
    tokenizer: TokenizerDir
    vae: VAEFile
    taehv: TAEHVFile | None = None


class FamilySpec(_Strict):
    """One model family (or the base architecture): everything `load_family` and `check` need."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    title: str
    kind: Literal["family", "base"] = "family"
    description: str
    reference: str | None = None
    architecture: Architecture
    video: Video
    stream: StreamSpec
    files: Files
    _path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_checks(self) -> "FamilySpec":
        arch, files = self.architecture, self.files
        if files.text_encoder.config.get("dim") != arch.text_dim:
            raise ValueError(f"files.text_encoder.config.dim {files.text_encoder.config.get('dim')} must equal "
                             f"architecture.text_dim {arch.text_dim}")
        if files.vae.config.get("z_dim", 16) != arch.in_dim:
            raise ValueError(f"files.vae.config.z_dim {files.vae.config.get('z_dim', 16)} must equal "
                             f"architecture.in_dim {arch.in_dim}")
        if self.files.lora is not None:
            expected = _lora_targets(arch.dit_config(), self.files.lora.target_modules, strict=False)
            if not expected:
                raise ValueError(f"files.lora.target_modules {list(self.files.lora.target_modules)} name no Linear "
                                 "module of a DiT block")
        self.stream_config()  # the StreamConfig itself validates sampler/schedule/transition combinations
        return self

    # --- derived ---------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        """The YAML this spec was read from (None when built in code)."""
        return self._path

    def dit_config(self, **overrides: Any) -> DiTConfig:
        return self.architecture.dit_config(**overrides)

    def latent_size(self, size: str | tuple[int, int] | None = None) -> tuple[int, int]:
        """(latent_height, latent_width) for a pixel size "WIDTHxHEIGHT" (or (width, height)); None: the YAML's."""
        if size is None:
            return self.video.latent_height, self.video.latent_width
        width, height = parse_size(size) if isinstance(size, str) else (int(size[0]), int(size[1]))
        _, sh, sw = self.video.vae_stride
        _, ph, pw = self.architecture.patch_size
        if height % (sh * ph) or width % (sw * pw):
            raise ValueError(f"size {width}x{height} (WxH): width must be a multiple of {sw * pw} and height of "
                             f"{sh * ph} (VAE stride x patch size)")
        return height // sh, width // sw

    def stream_config(self, latent: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
                      **overrides: Any):
        """The `StreamConfig` this family runs with (latent size from the YAML unless given; fp32 by default)."""
        import torch

        from ..engine.prompts import Transition
        from ..engine.stream import StreamConfig

        s = self.stream
        lh, lw = latent or (self.video.latent_height, self.video.latent_width)
        values: dict[str, Any] = dict(
            policy=s.policy, policy_settings=dict(s.policy_settings), sampler=s.sampler, schedule=s.schedule,
            steps=tuple(s.steps), warp_steps=s.warp_steps, shift=s.shift, context_noise=s.context_noise,
            chunk_frames=s.chunk_frames, transition=Transition(**s.transition.model_dump()),
            dtype=dtype or torch.float32)
        values.update(overrides)
        return StreamConfig(lh, lw, **values)

    def fed_timesteps(self) -> list[float]:
        """The float timesteps the DiT is called with (after warping), spec §b.2."""
        from ..sampling.schedule import FlowSchedule

        return FlowSchedule(self.stream.shift).step_list([float(s) for s in self.stream.steps], self.stream.warp_steps)

    def file_specs(self, decoder: str | None = "vae") -> list[tuple[str, FileSpec, bool]]:
        """(role, spec, required) for every file.

        decoder "vae" / "taehv": that decoder's file is required, the other optional; "preview": neither
        (no trained decoder); None: the YAML's `optional` flags.
        """
        if decoder is not None and decoder not in (*DECODERS, "preview"):
            raise ValueError(f"unknown decoder {decoder!r}; known: {', '.join(DECODERS)}, preview")
        f = self.files
        out: list[tuple[str, FileSpec, bool]] = [("dit", f.dit, not f.dit.optional)]
        if f.lora is not None:
            out.append(("lora", f.lora, not f.lora.optional))
        out += [("text_encoder", f.text_encoder, not f.text_encoder.optional),
                ("tokenizer", f.tokenizer, not f.tokenizer.optional),
                ("vae", f.vae, decoder == "vae" or (decoder is None and not f.vae.optional))]
        if f.taehv is not None:
            out.append(("taehv", f.taehv, decoder == "taehv" or (decoder is None and not f.taehv.optional)))
        elif decoder == "taehv":
            raise ValueError(f"family {self.name!r} declares no files.taehv; it cannot use the TAEHV decoder")
        return out


def _construct(cls: type, config: Mapping[str, Any]) -> Any:
    """cls(**config) with a missing or wrongly typed argument reported as a validation error."""
    try:
        return cls(**config)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _known_fields(config: Mapping[str, Any], cls: type) -> None:
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; known: {sorted(known)}")


def build_policy(name: str, settings: Mapping[str, Any]):
    """`make_policy` with every policy module registered (deep_sink_pc lives in cache/compression.py)."""
    from ..cache.policy import make_policy

    try:
        from ..cache import compression  # noqa: F401  (registers deep_sink_pc)
    except ImportError as exc:
        if name == "deep_sink_pc":
            raise ValueError("policy 'deep_sink_pc' is unavailable: streamgen.cache.compression does not import "
                             f"({exc})") from None
    return make_policy(name, **dict(settings))


def parse_size(text: str) -> tuple[int, int]:
    """"832x480" (pixels, WIDTHxHEIGHT) -> (832, 480)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a pixel size WIDTHxHEIGHT such as 832x480, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return width, height


# ------------------------------------------------------------------------------------------- lookup
def config_dir() -> Path:
    """The folder holding the family YAMLs: ``$STREAMGEN_CONFIGS/models`` or the package's ``configs/models``."""
    env = os.environ.get(CONFIG_ENV)
    return Path(env) / "models" if env else Path(__file__).resolve().parents[1] / "configs" / "models"


def family_files(directory: str | Path | None = None) -> dict[str, Path]:
    """{family name (file stem): YAML path}, sorted by name."""
    folder = Path(directory) if directory is not None else config_dir()
    if not folder.is_dir():
        raise FamilyConfigError(
            f"no model family configs at {folder}: set {CONFIG_ENV} to a folder that holds models/*.yaml")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _format_validation(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid model family config ({exc.error_count()} error{'s' * (exc.error_count() > 1)}):"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_family_file(path: str | Path) -> FamilySpec:
    """Read and validate one family YAML; any problem raises FamilyConfigError naming the file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FamilyConfigError(f"{path}: cannot read model family config: {exc}") from None
    except yaml.YAMLError as exc:
        raise FamilyConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FamilyConfigError(f"{path}: a model family config is a mapping, got {type(data).__name__}")
    try:
        spec = FamilySpec.model_validate(data)
    except ValidationError as exc:
        raise FamilyConfigError(_format_validation(path, exc)) from None
    if spec.name != path.stem:
        raise FamilyConfigError(f"{path}: name: {spec.name!r} must equal the file name {path.stem!r}")
    spec._path = path
    return spec


def load_family_config(name: str | Path | FamilySpec, directory: str | Path | None = None) -> FamilySpec:
    """A family by registry name, or by the path of a YAML file (e.g. a private family)."""
    if isinstance(name, FamilySpec):
        return name
    text = str(name)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return load_family_file(text)
    files = family_files(directory)
    if text not in files:
        raise FamilyConfigError(f"unknown model family {text!r}; known: {', '.join(files) or '(none)'} "
                                f"(configs in {Path(directory) if directory else config_dir()})")
    return load_family_file(files[text])


def load_all(directory: str | Path | None = None) -> tuple[list[FamilySpec], list[str]]:
    """Every valid family and the error message of every invalid YAML."""
    specs, errors = [], []
    for path in family_files(directory).values():
        try:
            specs.append(load_family_file(path))
        except FamilyConfigError as exc:
            errors.append(str(exc))
    return specs, errors


# ----------------------------------------------------------------------------------- lazy reading
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_lazy(path: str | Path) -> Any:
    """The checkpoint's structure with every tensor on the meta device (shape and dtype, no data).

    safetensors: header only (``safe_open`` metadata). Torch zip pickles: ``torch.load(mmap=True,
    map_location="meta", weights_only=True)`` — storages are memory-mapped, never read. Legacy
    (non-zip) pickles cannot be mapped: ``map_location="meta"`` still streams the file once but keeps
    nothing. Untrusted pickles run no code (weights_only).
    """
    import torch

    from ..models.checkpoint import CheckpointError

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                out = {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = getattr(torch, _SAFETENSORS_DTYPES.get(sl.get_dtype(), "float32"))
                    out[key] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
                return out
        if zipfile.is_zipfile(path):
            return torch.load(path, mmap=True, map_location="meta", weights_only=True)
        return torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a problem with this file
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def pick_envelope(obj: Any, envelope: str | tuple[str, ...], where: str) -> tuple[dict[str, Any], str]:
    """The weights dict inside a checkpoint: the first declared envelope present, or the file itself when flat.

    A flat file (all values tensors: any safetensors, Reward Forcing's .pt) is accepted whatever is
    declared. A file with envelopes must hold a declared one: picking another silently would run
    e.g. non-EMA weights where the release is meant to run its EMA ones.
    """
    import torch

    from ..models.checkpoint import CheckpointError

    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, expected a dict of tensors")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "flat"
    envelopes = (envelope,) if isinstance(envelope, str) else tuple(envelope)
    present = [k for k in obj if isinstance(obj[k], dict)]
    envelope = next((e for e in envelopes if e != "flat" and e in obj), "")
    if not envelope:
        named = [e for e in envelopes if e != "flat"]
        wanted = "a flat dict of tensors" if not named else "envelope " + " or ".join(map(repr, named))
        raise CheckpointError(f"{where}: expected {wanted}; the file has entries {sorted(map(str, obj))} "
                              f"(dict envelopes: {present or 'none'})")
    state = obj[envelope]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: envelope {envelope!r} holds a {type(state).__name__}, expected a dict")
    non_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise CheckpointError(f"{where}: envelope {envelope!r} has non-tensor entries: {_names(non_tensors)}")
    return state, envelope


def normalize_state(state: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Apply `checkpoint.normalize_key` (strip model., FSDP/compile segments) refusing collisions."""
    from ..models.checkpoint import CheckpointError, normalize_key

    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    collisions = []
    for raw, value in state.items():
        key = normalize_key(str(raw))
        if key in out:
            collisions.append(f"{key} <- {sources[key]}, {raw}")
        out[key], sources[key] = value, str(raw)
    if collisions:
        raise CheckpointError(f"{where}: several keys normalize to the same name: {_names(collisions)}")
    return out


def _names(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def compare_shapes(got: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], where: str,
                   flexible_rows: frozenset[str] = frozenset()) -> list[str]:
    """One line per problem: missing / unexpected keys (listed), each mis-shaped tensor by name.

    `flexible_rows`: keys whose first dim may be larger than expected (TAEHV TGrow weights the loader trims).
    """
    problems = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        problems.append(f"{where}: {len(missing)} missing key{'s' * (len(missing) > 1)}: {_names(missing)}")
    if unexpected:
        hint = ""
        if any(".attn1." in k or k.startswith("condition_embedder") for k in unexpected):
            hint = " (Diffusers-format WanTransformer3DModel names: convert to the original Wan key names)"
        problems.append(f"{where}: {len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)}{hint}: {_names(unexpected)}")
    misshaped = []
    for key in sorted(set(got) & set(expected)):
        shape, want = tuple(got[key].shape), tuple(expected[key])
        if shape == want or (key in flexible_rows and len(shape) == len(want) and shape[0] >= want[0]
                             and shape[1:] == want[1:]):
            continue
        misshaped.append(f"{where}: {key}: got {shape}, expected {want}")
    problems += misshaped[:_MAX_LISTED]
    if len(misshaped) > _MAX_LISTED:
        problems.append(f"{where}: ... and {len(misshaped) - _MAX_LISTED} more mis-shaped tensors")
    return problems


def _lora_targets(cfg: DiTConfig, modules: tuple[str, ...], strict: bool = True) -> dict[str, tuple[int, int]]:
    """{block module path: (out, in)} of every LoRA target in every block."""
    import torch

    from ..models.dit import Block

    with torch.device("meta"):
        block = Block(cfg, 0)
    linears = {name: tuple(m.weight.shape) for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [m for m in modules if m not in linears]
    if unknown and strict:
        raise ValueError(f"LoRA target modules {unknown} are not Linear layers of a block; known: {sorted(linears)}")
    return {f"blocks.{i}.{m}": linears[m] for i in range(cfg.num_layers) for m in modules if m in linears}


# ------------------------------------------------------------------------------- expected shapes
def _meta_shapes(module_fn) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        module = module_fn()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def expected_dit_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    from ..models.dit import WanDiT

    return _meta_shapes(lambda: WanDiT(cfg))


def expected_umt5_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    from ..models.umt5 import UMT5Config, UMT5Encoder

    return _meta_shapes(lambda: UMT5Encoder(UMT5Config(**config)))


def vae_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    from ..models.wan_vae import WanVAE

    return WanVAE.config_kwargs(config)


def expected_vae_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    from ..models.wan_vae import WanVAE

    return _meta_shapes(lambda: WanVAE(**vae_kwargs(config)))


def taehv_config(config: Mapping[str, Any]):
    from ..models.taehv import TAEHVConfig

    return TAEHVConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


# ------------------------------------------------------------------------------------------- check
@dataclass
class FileCheck:
    """The outcome for one role (dit, lora, text_encoder, tokenizer, vae, taehv)."""

    role: str
    required: bool
    path: Path | None  # the file found (None: none of the candidates exists)
    summary: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.problems:
            return "FAIL"
        return "ok" if self.path is not None else "--"


@dataclass
class CheckReport:
    family: FamilySpec
    model_dir: Path
    files: list[FileCheck]
    warnings: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [p for f in self.files for p in f.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def file(self, role: str) -> FileCheck | None:
        return next((f for f in self.files if f.role == role), None)

    def render(self) -> str:
        lines = [f"{self.family.name} ({self.family.title}) in {self.model_dir}"
                 + (f"  [config {self.family.path}]" if self.family.path else "")]
        for f in self.files:
            where = str(f.path.relative_to(self.model_dir)) if f.path is not None else "-"
            lines.append(f"  {f.status:<4} {f.role:<12} {where}  {f.summary}".rstrip())
        lines += [f"  warning: {w}" for w in self.warnings]
        problems = self.problems
        if problems:
            lines.append(f"{len(problems)} problem{'s' * (len(problems) > 1)}:")
            lines += [f"  - {p}" for p in problems]
        else:
            lines.append("ok: every required file is present with the expected keys and shapes")
        return "\n".join(lines)


_ROLE_TEXT = {"dit": "the DiT checkpoint", "text_encoder": "the umT5-xxl text encoder",
              "tokenizer": "the umT5 tokenizer folder", "vae": "the Wan2.1 VAE", "taehv": "the TAEHV decoder"}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")  # PEFT naming


def _find(model_dir: Path, spec: FileSpec, want_dir: bool = False) -> Path | None:
    for rel in spec.path:
        p = model_dir / rel
        if (p.is_dir() if want_dir else p.is_file()):
            return p
    return None


def _dtypes(state: Mapping[str, Any]) -> str:
    import torch

    names = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if isinstance(v, torch.Tensor)})
    return "/".join(names)


class _LazyFiles:
    """read_lazy memoized per path, so checking several families reads each header once."""

    def __init__(self) -> None:
        self._cache: dict[Path, Any] = {}

    def __call__(self, path: Path) -> Any:
        if path not in self._cache:
            self._cache[path] = read_lazy(path)
        return self._cache[path]


def check_model_dir(family: str | Path | FamilySpec, model_dir: str | Path, decoder: str | None = "vae",
                    _reader: _LazyFiles | None = None) -> CheckReport:
    """Check that `model_dir` holds every file `family` needs, with the right keys and shapes.

    Reads headers only (see `read_lazy`). `decoder` ("vae" | "taehv") makes that decoder's file
    required and the other optional, "preview" neither; None follows the YAML's `optional` flags.
    """
    import torch

    from ..models.checkpoint import CheckpointError

    spec = load_family_config(family)
    model_dir = Path(model_dir)
    reader = _reader or _LazyFiles()
    report = CheckReport(spec, model_dir, [])
    if not model_dir.is_dir():
        report.files.append(FileCheck("dir", True, None, problems=[f"model dir {model_dir} does not exist"]))
        return report
    dit_cfg = spec.dit_config()
    for role, fspec, required in spec.file_specs(decoder):
        found = _find(model_dir, fspec, want_dir=role == "tokenizer")
        check = FileCheck(role, required, found)
        report.files.append(check)
        if found is None:
            tried = ", ".join(fspec.path)
            what = _ROLE_TEXT.get(role, role)
            if isinstance(fspec, LoraFile):
                what = f"its LoRA adapter, rank {fspec.rank}, alpha {fspec.alpha:g}"
            src = f"; get it from {fspec.source}" if fspec.source else ""
            if required:
                check.problems.append(f"{spec.title} needs {fspec.path[0]} ({what}) in {model_dir}: not found "
                                      f"(looked for {tried}){src}")
            else:
                check.summary = f"not found (optional: {tried})"
            continue
        where = str(found.relative_to(model_dir))
        try:
            if role == "dit":
                state, env = pick_envelope(reader(found), spec.files.dit.envelope, where)
                state = normalize_state(state, where)
                expected = expected_dit_shapes(dit_cfg)
                check.problems += compare_shapes(state, expected, where)
                params = sum(math.prod(s.shape) for s in state.values())
                check.summary = f"[{env}] {len(state)} tensors, {_dtypes(state)}, {params:,} params"
                if env == "flat" and "flat" not in spec.files.dit.envelope:
                    report.warnings.append(f"{where}: a flat state dict, used as is (the release has "
                                           f"envelope {spec.files.dit.envelope_text})")
            elif role == "lora":
                check.problems += _check_lora(reader(found), spec, where)
                check.summary = f"rank {spec.files.lora.rank}, alpha {spec.files.lora.alpha:g}" if not check.problems else ""
            elif role == "text_encoder":
                state, _ = pick_envelope(reader(found), "flat", where)
                check.problems += compare_shapes(state, expected_umt5_shapes(spec.files.text_encoder.config), where)
                check.summary = f"{len(state)} tensors, {_dtypes(state)}"
            elif role == "tokenizer":
                missing = [n for n in spec.files.tokenizer.files if not (found / n).is_file()]
                if missing:
                    check.problems.append(f"{where}: tokenizer folder lacks {', '.join(missing)}")
                check.summary = ", ".join(spec.files.tokenizer.files)
                try:
                    import tokenizers  # noqa: F401
                except ImportError:
                    report.warnings.append("the umT5 tokenizer needs the optional package 'tokenizers' "
                                           "(pip install tokenizers) to load")
            elif role == "vae":
                state, _ = pick_envelope(reader(found), "flat", where)
                check.problems += compare_shapes(state, expected_vae_shapes(spec.files.vae.config), where)
                check.summary = f"{len(state)} tensors, {_dtypes(state)}"
            elif role == "taehv":
                from ..models.taehv import TAEHV

                cfg = taehv_config(spec.files.taehv.config)
                with torch.device("meta"):
                    model = TAEHV(cfg)
                state, _ = pick_envelope(reader(found), "flat", where)
                check.problems += compare_shapes(state, model.expected_shapes(), where,
                                                 flexible_rows=frozenset(model.tgrow_weight_keys()))
                check.summary = f"{len(state)} tensors, {_dtypes(state)}"
        except CheckpointError as exc:
            check.problems.append(str(exc))
        if check.problems and not required:
            check.problems = [p + " (optional file, but present and wrong)" for p in check.problems]
    return report


def _check_lora(obj: Any, spec: FamilySpec, where: str) -> list[str]:
    """Pairs, rank and coverage of a PEFT LoRA adapter against the DiT's Linear shapes."""
    import torch

    from ..models.checkpoint import normalize_key

    lora = spec.files.lora
    assert lora is not None
    if not isinstance(obj, dict):
        return [f"{where}: holds a {type(obj).__name__}, expected a dict"]
    adapter = obj.get(lora.key, obj)
    if not isinstance(adapter, dict) or not adapter:
        return [f"{where}: no LoRA adapter (entry {lora.key!r} missing or empty; entries: {sorted(map(str, obj))})"]
    bad = sorted(str(k) for k, v in adapter.items() if not isinstance(v, torch.Tensor))
    if bad:
        return [f"{where}: no LoRA adapter at {lora.key!r}: non-tensor entries {_names(bad)}"]
    targets = _lora_targets(spec.dit_config(), lora.target_modules)
    problems, pairs, foreign = [], {}, []
    for key, value in adapter.items():
        m = _LORA_KEY.match(str(key))
        if m is None:
            foreign.append(str(key))
            continue
        pairs.setdefault(normalize_key(m["module"]), {})[m["part"]] = value
    if foreign:
        problems.append(f"{where}: {len(foreign)} keys are not base_model.model.<module>.lora_{{A|B}}.weight: {_names(foreign)}")
    unknown = sorted(set(pairs) - set(targets))
    missing = sorted(set(targets) - set(pairs))
    if unknown:
        problems.append(f"{where}: adapter for {len(unknown)} modules that are not LoRA targets of this DiT: {_names(unknown)}")
    if missing:
        problems.append(f"{where}: no adapter for {len(missing)} of {len(targets)} target modules: {_names(missing)}")
    shape_problems = []
    for module in sorted(set(pairs) & set(targets)):
        pair, (out_f, in_f) = pairs[module], targets[module]
        if set(pair) != {"A", "B"}:
            shape_problems.append(f"{where}: {module}: lora_{'B' if 'A' in pair else 'A'} missing")
            continue
        want_a, want_b = (lora.rank, in_f), (out_f, lora.rank)
        for part, want in (("A", want_a), ("B", want_b)):
            if tuple(pair[part].shape) != want:
                shape_problems.append(f"base_model.model.{module}.lora_{part}.weight: got {tuple(pair[part].shape)}, "
                                      f"expected {want} (rank {lora.rank})")
    problems += [p if p.startswith(where) else f"{where}: {p}" for p in shape_problems[:_MAX_LISTED]]
    if len(shape_problems) > _MAX_LISTED:
        problems.append(f"{where}: ... and {len(shape_problems) - _MAX_LISTED} more LoRA shape problems")
    return problems


# ---------------------------------------------------------------------------------- presentation
def _policy_text(spec: FamilySpec) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in spec.stream.policy_settings.items())
    return f"{spec.stream.policy}({settings})"


def render_list(specs: list[FamilySpec]) -> str:
    rows = [("NAME", "KIND", "SAMPLER", "STEPS", "SHIFT", "DIT CHECKPOINT", "POLICY")]
    for s in specs:
        steps = f"{len(s.stream.steps)} {'warped' if s.stream.warp_steps else 'raw'}"
        rows.append((s.name, s.kind, s.stream.sampler, steps, f"{s.stream.shift:g}",
                     f"{s.files.dit.path[0]} [{s.files.dit.envelope_text}]" + (" + lora" if s.files.lora else ""),
                     _policy_text(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render_show(spec: FamilySpec) -> str:
    a, v, s = spec.architecture, spec.video, spec.stream
    cfg = spec.dit_config()
    shapes = expected_dit_shapes(cfg)
    params = sum(math.prod(x) for x in shapes.values())
    tokens = (v.latent_height // a.patch_size[1]) * (v.latent_width // a.patch_size[2])
    kv_frame = tokens * a.num_layers * 2 * a.dim * 2  # K+V, bf16
    cap = s.policy_settings.get("capacity_frames")
    lines = [
        f"{spec.name}: {spec.title} ({spec.kind})",
        f"  {spec.description}",
        f"  config:       {spec.path}" if spec.path else "",
        f"  reference:    {spec.reference}" if spec.reference else "",
        f"  architecture: dim {a.dim}, ffn {a.ffn_dim}, {a.num_heads} heads x {cfg.head_dim}, {a.num_layers} layers, "
        f"text {a.text_len}x{a.text_dim}, patch {tuple(a.patch_size)}: {len(shapes)} keys, {params:,} params",
        f"  video:        {v.width}x{v.height} (WxH) at {v.fps:g} fps -> latent {v.latent_height}x{v.latent_width} (HxW), "
        f"{tokens} tokens per latent frame",
        f"  policy:       {_policy_text(spec)}",
        f"  sampler:      {s.sampler}, schedule {s.schedule}, chunk {s.chunk_frames} frames, context_noise {s.context_noise:g}",
        f"  steps:        {[int(x) if x == int(x) else x for x in s.steps]} {'warped' if s.warp_steps else 'raw'}, "
        f"shift {s.shift:g} -> fed timesteps {[round(t, 4) for t in spec.fed_timesteps()]}",
        f"  transition:   {s.transition.kind}"
        + (f" over {s.transition.chunks} chunk(s)" if s.transition.kind == "blend" else ""),
        f"  KV cache:     {kv_frame / 2**20:.1f} MiB per latent frame (bf16)"
        + (f", {cap} frames = {cap * kv_frame / 2**30:.2f} GiB" if isinstance(cap, int) else ""),
        "  files (relative to the model dir):",
    ]
    for role, fs, required in spec.file_specs(decoder=None):
        extra = ""
        if role == "dit":
            extra = f" [envelope {fs.envelope_text}]"
        elif role == "lora":
            extra = f" [{fs.key}, rank {fs.rank}, alpha {fs.alpha:g}, {len(fs.target_modules)} modules per block]"
        lines.append(f"    {role:<12} {fs.shown}{extra}{'' if required else ' (optional)'}"
                     + (f"  <- {fs.source}" if fs.source else ""))
    return "\n".join(line for line in lines if line)


# ------------------------------------------------------------------------------------------- CLI
def cmd_models_list(args: argparse.Namespace) -> int:
    specs, errors = load_all(args.configs)
    print(render_list(specs))
    for err in errors:
        print(err, file=sys.stderr)
    return 1 if errors else 0


def cmd_models_show(args: argparse.Namespace) -> int:
    print(render_show(load_family_config(args.name, args.configs)))
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    reader = _LazyFiles()
    if args.family:
        report = check_model_dir(load_family_config(args.family, args.configs), args.dir, args.decoder, reader)
        print(report.render())
        return 0 if report.ok else 1
    specs, errors = load_all(args.configs)
    for err in errors:
        print(err, file=sys.stderr)
    usable = []
    for spec in specs:
        report = check_model_dir(spec, args.dir, args.decoder, reader)
        dit = report.file("dit")
        if dit is not None and dit.path is None:
            print(f"--   {spec.name}: not here (no {spec.files.dit.shown})")
            continue
        print(report.render())
        if report.ok:
            usable.append(spec.name)
    print(f"usable families in {args.dir}: {', '.join(usable) if usable else 'none'}")
    return 0 if usable else 1


def add_models_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `streamgen models list | show NAME | check DIR [--family NAME] [--decoder vae|taehv]`."""
    models = subparsers.add_parser("models", help="model families: list, show, check a local model dir")
    models.add_argument("--configs", type=Path, default=None,
                        help=f"folder of family YAMLs (default: ${CONFIG_ENV}/models or the package's configs/models)")
    sub = models.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="every family with its cache policy, sampler and steps")
    ls.set_defaults(func=cmd_models_list)
    show = sub.add_parser("show", help="one family's architecture, stream settings and files")
    show.add_argument("name", help="family name or path of a family YAML")
    show.set_defaults(func=cmd_models_show)
    check = sub.add_parser("check", help="validate a local model dir (files, keys, shapes; reads headers only)")
    check.add_argument("dir", type=Path)
    check.add_argument("--family", help="family name or YAML path (default: try every family)")
    check.add_argument("--decoder", choices=DECODERS, default="vae", help="decoder whose file is required (default vae)")
    check.set_defaults(func=cmd_models_check)
    return models


# ------------------------------------------------------------------------------- precision options
def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dtype --quant --compile --cuda-graphs` for `serve`, `render` and `bench engine` (`precision_settings`)."""
    g = parser.add_argument_group("precision")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="DiT weights and activations (default auto: bf16 on CUDA, fp32 on the CPU); the time "
                        "embedding and modulation stay fp32, norms compute in fp32, RoPE in float64")
    g.add_argument("--quant", choices=QUANT_MODES, default="none",
                   help="weight-only quantization of the blocks' attention and FFN linears, per output channel "
                        "(int8 / fp8 e4m3: half the weight memory of bf16; on the CPU no faster)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT (compiles on the first chunk)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each DiT call as CUDA graphs (torch.compile mode reduce-overhead; needs a GPU)")


def precision_settings(args: argparse.Namespace) -> dict[str, str]:
    """The `load_bundle` keywords (dtype, quant, compile) the options of `add_precision_arguments` set;
    defaults are left out, so a command line without them passes nothing. `--cuda-graphs` without a GPU is
    refused here, before the command builds or loads anything."""
    from .bundle import require_cuda_for

    defaults = {"dtype": "auto", "quant": "none", "compile": "none"}
    compile = "cuda-graphs" if args.cuda_graphs else "inductor" if args.compile else "none"
    require_cuda_for(compile)
    given = {"dtype": args.dtype, "quant": args.quant, "compile": compile}
    return {k: v for k, v in given.items() if v != defaults[k]}


# ------------------------------------------------------------------------------------- benchmark
def add_bench_model_options(parser: argparse.ArgumentParser) -> None:
    """`--model NAME --random-weights --size WxH` for `streamgen bench engine` (see `bench_setup_from_args`)."""
    parser.add_argument("--model", help="model family / architecture from streamgen/configs/models (e.g. wan2.1-t2v-1.3b): "
                                        "its real DiT dims and stream settings; --layers/--dim/--heads reduce it")
    parser.add_argument("--random-weights", action="store_true",
                        help="with --model: random weights at the family's architecture, no files (required: the "
                             "engine bench measures random-weight DiTs)")
    parser.add_argument("--size", help="with --model: video size WIDTHxHEIGHT in pixels (default: the family's, 832x480)")
    parser.add_argument("--decode", choices=("vae", "taehv", "none"), default="vae",
                        help="with --model: decode every chunk (random-weight Wan VAE or TAEHV at real widths)")


def bench_engine_setup(model: str | FamilySpec, size: str | None = None, *, layers: int | None = None,
                       dim: int | None = None, heads: int | None = None, ffn_dim: int | None = None,
                       policy: str | None = None, policy_settings: Mapping[str, Any] | None = None,
                       sampler: str | None = None, schedule: str | None = None, steps: list[float] | None = None,
                       batch_slots: bool = True, seed: int = 0, chunks: int | None = None):
    """(DiTConfig, StreamConfig) for `bench.engine.EngineBench` from a registry name.

    The family's architecture, optionally reduced (`reduced_architecture`), and its stream settings; a
    given `policy` replaces the family's policy and settings, `policy_settings` alone update them.
    A `full` policy cannot run more chunks than its capacity: that is refused up front.
    """
    spec = load_family_config(model)
    cfg = reduced_architecture(spec, layers=layers, dim=dim, heads=heads, ffn_dim=ffn_dim)
    if policy is not None and policy != spec.stream.policy:
        settings = dict(policy_settings or {})
    else:
        policy = spec.stream.policy
        settings = {**spec.stream.policy_settings, **dict(policy_settings or {})}
    overrides: dict[str, Any] = dict(policy=policy, policy_settings=settings, batch_slots=batch_slots, seed=seed)
    if sampler is not None:
        overrides["sampler"] = sampler
    if schedule is not None:
        overrides["schedule"] = schedule
    if steps:
        overrides["steps"] = tuple(steps)
    stream = spec.stream_config(spec.latent_size(size), **overrides)
    pol = build_policy(stream.policy, stream.policy_settings)
    if chunks is not None and stream.policy == "full" and chunks * stream.chunk_frames > pol.capacity_frames:
        raise ValueError(
            f"{spec.name} runs policy 'full' ({pol.capacity_frames} frames = {pol.capacity_frames // stream.chunk_frames} "
            f"chunks); {chunks} chunks do not fit: pass --chunks {pol.capacity_frames // stream.chunk_frames}, or a bounded "
            "policy, e.g. --policy window_sink --policy-setting capacity_frames=21 --policy-setting sink_frames=3")
    return cfg, stream


def reduced_architecture(spec: FamilySpec, layers: int | None = None, dim: int | None = None,
                         heads: int | None = None, ffn_dim: int | None = None) -> DiTConfig:
    """The family's DiTConfig with fewer layers / a smaller width (CPU benchmarks).

    A new `dim` keeps the head size (heads = dim / head_dim unless given) and the FFN ratio.
    """
    base = spec.dit_config()
    changes: dict[str, Any] = {}
    if layers is not None:
        changes["num_layers"] = layers
    if dim is not None:
        changes["dim"] = dim
        if heads is None:
            if dim % base.head_dim:
                raise ValueError(f"--dim {dim} is not a multiple of the head size {base.head_dim}; pass --heads")
            heads = dim // base.head_dim
        if ffn_dim is None:
            ffn_dim = max(1, round(dim * base.ffn_dim / base.dim))
    if heads is not None:
        changes["num_heads"] = heads
    if ffn_dim is not None:
        changes["ffn_dim"] = ffn_dim
    return spec.dit_config(**changes)


def bench_setup_from_args(args: argparse.Namespace):
    """(DiTConfig, StreamConfig) for `bench engine` when `--model` is given, else None.

    Reads --model --random-weights --size and the existing --layers --dim --heads --ffn-dim --policy
    --policy-setting --sampler --schedule --steps --unbatched --seed --chunks (None = the family's).
    """
    if getattr(args, "model", None) is None:
        return None
    if not args.random_weights:
        raise ValueError("bench engine builds its own random-weight DiT: with --model, pass --random-weights")
    return bench_engine_setup(
        args.model, args.size, layers=args.layers, dim=args.dim, heads=args.heads, ffn_dim=args.ffn_dim,
        policy=args.policy, policy_settings=dict(args.policy_setting), sampler=args.sampler, schedule=args.schedule,
        steps=args.steps, batch_slots=not args.unbatched, seed=args.seed, chunks=args.chunks)


def bench_decoder(args: argparse.Namespace):
    """The frame-decoder factory `bench engine --model … --decode vae|taehv` measures (None: no decode)."""
    if getattr(args, "model", None) is None or args.decode == "none":
        return None
    from .bundle import resolve_dtype
    from .real import random_decoder

    device = getattr(args, "device", "cpu")
    return random_decoder(load_family_config(args.model), args.decode, device, dtype=resolve_dtype(args.dtype, device))


def bench_bundle(name: str, size: str = "832x480", random_weights: bool = True, layers: int | None = None,
                 dim: int | None = None, **kwargs: Any):
    """A `ModelBundle` of the family's real architecture (see `streamgen.bundles.real.bench_bundle`)."""
    from .real import bench_bundle as _bench_bundle

    return _bench_bundle(name, size=size, random_weights=random_weights, layers=layers, dim=dim, **kwargs)


__all__ = [
    "FamilySpec", "FamilyConfigError", "ModelDirError", "CheckReport", "config_dir", "family_files",
    "load_family_config", "load_family_file", "load_all", "check_model_dir", "read_lazy", "add_models_parser",
    "add_bench_model_options", "bench_engine_setup", "bench_setup_from_args", "bench_bundle", "parse_size",
    "add_precision_arguments", "precision_settings",
]
