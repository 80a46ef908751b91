"""Model families: one YAML per model family (`streamgen/configs/models/<name>.yaml`), validated with pydantic,
and what a model dir must hold (`streamgen models list | show | check` in `models_cli`).

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
                   patch_size, eps, qk_norm, cross_attn_norm, rope_theta, rope_max_frames,   # DiTConfig
                   variant: t2v | s2v,          # s2v: LiveAvatar's causal Wan2.2-S2V DiT (models/s2v)
                   s2v: {cond_dim, audio_dim, audio_layers, num_audio_token, audio_inject_layers,
                         audio_norm_eps, motion_frames, zip_frame_buckets, ref_rope_frame}}  # S2VConfig, s2v only
    video: {width, height, latent_height, latent_width, vae_stride: [4, 8, 8], fps}
    stream: {policy, policy_settings: {...}, sampler, schedule, steps, warp_steps, shift, context_noise,
             chunk_frames, transition: {kind, chunks, interpolation}}                     # StreamConfig
             # policy s2v_rings (variant s2v only, the DiT's own caches, MODEL_CACHES):
             #   policy_settings {capacity_frames (ring per step), cond_tokens, rd_range: [lo, hi]}
    files:                         # path: one relative path or a list of alternatives (first found wins)
      dit: {path, envelope: generator_ema | generator | model | flat (or a preference list), source,
            config_json}           # path *.safetensors.index.json: Hugging Face shards (envelope flat);
                                   # config_json: the model's config.json, checked against architecture
      lora: {path, key: generator_lora | null, rank, alpha, target_modules: [...], source,   # optional
             match: block | suffix,       # block: paths inside every DiT block; suffix: PEFT's rule, whole model
             adapter_name: null | default, prefix_optional: false}   # key form, see checkpoint.LoraRule
      text_encoder: {path, config: {UMT5Config fields}, source}
      tokenizer: {path: <dir>, files: [tokenizer.json], source}
      vae: {path, config: {dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample}}
      taehv: {path, optional: true, config: {TAEHVConfig fields}}                       # optional
      audio_encoder: {path: <dir>, files: [config.json, ...], weights: [model.safetensors, ...]}  # s2v: wav2vec2

This module imports no torch: the CLI parser and `models list` stay fast.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..models.config import DiTConfig, TAEHVConfig, UMT5Config

if TYPE_CHECKING:
    import torch



CONFIG_ENV = "STREAMGEN_CONFIGS"


DEFAULT_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


DECODERS = ("vae", "taehv")  # the trained decoders a family's files may hold
BUNDLE_DECODERS = (*DECODERS, "preview")  # what a family bundle can decode with ("preview": no files)


class FamilyConfigError(ValueError):
    """A family YAML that cannot be found, parsed or validated; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_or_many(value: Any) -> Any:
    """A YAML field that takes one string or a list of them: one string becomes a 1-tuple."""
    return (value,) if isinstance(value, str) else value


def _builds(info: ValidationInfo) -> bool:
    """Whether validation may build the torch objects some checks need (cache policy, StreamConfig, DiT
    block): not when only listing, which then stays torch-free and quick (context {"build": False})."""
    return (info.context or {}).get("build", True)


class S2VArchitecture(_Strict):
    """The Wan2.2-S2V extras of `streamgen.models.s2v.S2VConfig` (spec avatar §2.1); the checks here are
    torch-free, `S2VConfig` itself is built when validation may build (see `_builds`)."""

    cond_dim: int = Field(gt=0)
    audio_dim: int = Field(gt=0)
    audio_layers: int = Field(gt=0)  # wav2vec2 hidden states: embedding output + every layer
    num_audio_token: int = Field(gt=0)
    audio_inject_layers: tuple[int, ...] = Field(min_length=1)
    audio_norm_eps: float = Field(1e-5, gt=0)
    motion_frames: int = Field(gt=0)
    zip_frame_buckets: tuple[int, int, int]
    ref_rope_frame: int = Field(ge=0)

    @field_validator("audio_inject_layers")
    @classmethod
    def _increasing(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if layers[0] < 0 or any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"audio_inject_layers must be block indices in increasing order, got {list(layers)}")
        return layers

    @field_validator("zip_frame_buckets")
    @classmethod
    def _buckets(cls, buckets: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(b <= 0 for b in buckets):
            raise ValueError(f"zip_frame_buckets must be positive, got {list(buckets)}")
        return buckets


class Architecture(_Strict):
    """The DiT's shape: every field of `DiTConfig` (spec §a.1 for Wan2.1-T2V-1.3B); `variant: s2v` with an
    `s2v` block: LiveAvatar's causal Wan2.2-S2V DiT (`S2VConfig`)."""

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
    variant: Literal["t2v", "s2v"] = "t2v"
    s2v: S2VArchitecture | None = None

    @model_validator(mode="after")
    def _dit_config(self, info: ValidationInfo) -> "Architecture":
        DiTConfig(**self._dit_fields())  # head divisibility, even head_dim, temporal patch 1
        if (self.variant == "s2v") != (self.s2v is not None):
            raise ValueError("variant s2v needs an s2v block (and only variant s2v takes one)")
        if self.s2v is not None:
            if self.s2v.audio_inject_layers[-1] >= self.num_layers:
                raise ValueError(f"s2v.audio_inject_layers {list(self.s2v.audio_inject_layers)} outside the "
                                 f"{self.num_layers} blocks")
            if _builds(info):
                self.dit_config()  # S2VConfig's own checks (imports torch)
        return self

    def _dit_fields(self) -> dict[str, Any]:
        return self.model_dump(exclude={"variant", "s2v"})

    def dit_config(self, **overrides: Any) -> DiTConfig:
        """`DiTConfig`; for variant s2v an `S2VConfig` (a DiTConfig subclass; importing it imports torch)."""
        values = {**self._dit_fields(), **(self.s2v.model_dump() if self.s2v is not None else {}), **overrides}
        if self.variant == "s2v":
            from ..models.s2v.config import S2VConfig

            return S2VConfig(**values)
        return DiTConfig(**values)


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
    """How a prompt switch lands: `recache` (LongLive KV re-cache) or `blend` over `chunks` chunks (linear or
    slerp); a family's default, and what a live prompt message may ask for."""

    kind: Literal["recache", "blend"] = "recache"
    chunks: int = Field(1, ge=1, le=32)
    interpolation: Literal["linear", "slerp"] = "linear"


class S2VRingSettings(_Strict):
    """`policy: s2v_rings` (LiveAvatar, spec avatar §2.6-2.7): one ring of `capacity_frames` latent frames
    of noisy roped keys per denoising step, a cond ("sink") cache of `cond_tokens` tokens, the reference's
    RoPE roll drawn from `rd_range` (inclusive) per call."""

    capacity_frames: int = Field(gt=0)
    cond_tokens: int = Field(gt=0)
    rd_range: tuple[int, int]

    @field_validator("rd_range")
    @classmethod
    def _range(cls, rd: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= rd[0] <= rd[1]:
            raise ValueError(f"rd_range must be [lo, hi] with 0 <= lo <= hi, got {list(rd)}")
        return rd


# Caches a DiT variant brings itself instead of a `cache.policy` policy: name -> (variant, settings schema).
MODEL_CACHES: dict[str, tuple[str, type[_Strict]]] = {"s2v_rings": ("s2v", S2VRingSettings)}


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
    def _policy_exists(self, info: ValidationInfo) -> "StreamSpec":
        if self.policy in MODEL_CACHES:  # the DiT's own caches: settings checked here, torch-free
            try:
                MODEL_CACHES[self.policy][1].model_validate(self.policy_settings)
            except ValidationError as exc:
                detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(settings)'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"policy {self.policy!r} with policy_settings {self.policy_settings}: {detail}") from None
            return self
        if not _builds(info):
            return self
        try:
            build_policy(self.policy, self.policy_settings)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"policy {self.policy!r} with policy_settings {self.policy_settings}: {exc}") from None
        return self

    def to_config(self, latent: tuple[int, int], dtype: torch.dtype | None = None, **overrides: Any):
        """The `StreamConfig` of these settings at `latent` (height, width); fp32 unless `dtype`."""
        import torch

        from ..engine.prompts import Transition
        from ..engine.stream import StreamConfig

        values: dict[str, Any] = dict(
            policy=self.policy, policy_settings=dict(self.policy_settings), sampler=self.sampler,
            schedule=self.schedule, steps=tuple(self.steps), warp_steps=self.warp_steps, shift=self.shift,
            context_noise=self.context_noise, chunk_frames=self.chunk_frames,
            transition=Transition(**self.transition.model_dump()), dtype=dtype or torch.float32)
        values.update(overrides)
        return StreamConfig(*latent, **values)


def stream_spec(**values: Any) -> StreamSpec:
    """A `StreamSpec` from code, its policy checked later, when its `StreamConfig` is built (torch-free)."""
    return StreamSpec.model_validate(values, context={"build": False})


def _relative_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    for p in paths:
        if not p or Path(p).is_absolute() or ".." in Path(p).parts:
            raise ValueError(f"{p!r}: paths are relative to the model dir (no absolute paths, no '..')")
    return paths


class FileSpec(_Strict):
    """A file (or a folder, for the tokenizer) relative to the model dir; a list gives alternatives."""

    path: tuple[str, ...]
    optional: bool = False
    source: str | None = None  # where to get it (Hugging Face repo), for messages

    _paths = field_validator("path", mode="before")(classmethod(lambda cls, value: _one_or_many(value)))

    @field_validator("path")
    @classmethod
    def _relative(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        if not paths:
            raise ValueError("give at least one path")
        return _relative_paths(paths)

    @property
    def shown(self) -> str:
        return " | ".join(self.path)


class DiTFile(FileSpec):
    """`envelope`: the entry holding the weights (a list: accepted entries in preference order). A path
    ending in ``.index.json`` is a Hugging Face shard index (its shards are flat: envelope flat).
    `config_json`: the model's own config (Hugging Face ``config.json``), whose architecture fields
    must equal the YAML's."""

    envelope: tuple[Literal["generator_ema", "generator", "model", "flat"], ...] = Field(min_length=1)
    config_json: str | None = None

    _envelopes = field_validator("envelope", mode="before")(classmethod(lambda cls, value: _one_or_many(value)))

    @field_validator("config_json")
    @classmethod
    def _config_relative(cls, value: str | None) -> str | None:
        return None if value is None else _relative_paths((value,))[0]

    @model_validator(mode="after")
    def _shards_are_flat(self) -> "DiTFile":
        if self.sharded and self.envelope != ("flat",):
            raise ValueError(f"a shard index ({self.shown}) names flat shards: envelope must be flat")
        return self

    @property
    def sharded(self) -> bool:
        return any(p.lower().endswith(".index.json") for p in self.path)

    @property
    def envelope_text(self) -> str:
        return "|".join(self.envelope)


class LoraFile(FileSpec):
    """A PEFT LoRA adapter, merged at alpha / rank. `match`: how `target_modules` resolve (block: module
    paths inside every DiT block; suffix: PEFT's rule over the whole model, every Linear named m or
    ending in .m). `adapter_name` / `prefix_optional`: the key form (`checkpoint.LoraRule`)."""

    key: str | None = "generator_lora"  # the adapter's entry in the file (a file without it, or null: bare adapter)
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS  # Linear modules inside every block
    match: Literal["block", "suffix"] = "block"
    adapter_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$")
    prefix_optional: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def rule(self, targets: Any = None):
        """The `checkpoint.LoraRule` of this file (imports torch); `targets`: module names that must each
        get one pair (e.g. `lora_targets(...)`), None: any module of the state dict."""
        from ..models.checkpoint import LoraRule

        return LoraRule(rank=self.rank, alpha=self.alpha, adapter=self.adapter_name,
                        prefix_optional=self.prefix_optional, targets=None if targets is None else frozenset(targets))


class TextEncoderFile(FileSpec):
    config: dict[str, Any]

    @field_validator("config")
    @classmethod
    def _umt5(cls, config: dict[str, Any]) -> dict[str, Any]:
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
        _known_fields(config, TAEHVConfig)
        _construct(TAEHVConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        return config


class AudioEncoderDir(FileSpec):
    """A Hugging Face wav2vec2 folder (`Wav2Vec2ForCTC.from_pretrained`): every one of `files` and one of
    `weights` (alternatives); its config.json must give the S2V audio width (hidden_size =
    architecture.s2v.audio_dim) and hidden-state count (num_hidden_layers + 1 = audio_layers)."""

    files: tuple[str, ...] = ("config.json", "preprocessor_config.json")
    weights: tuple[str, ...] = Field(("model.safetensors", "pytorch_model.bin"), min_length=1)

    @field_validator("files", "weights")
    @classmethod
    def _inside(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return _relative_paths(names)


class Files(_Strict):
    dit: DiTFile
    lora: LoraFile | None = None
    text_encoder: TextEncoderFile
    tokenizer: TokenizerDir
    vae: VAEFile
    taehv: TAEHVFile | None = None
    audio_encoder: AudioEncoderDir | None = None


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
    def _cross_checks(self, info: ValidationInfo) -> "FamilySpec":
        arch, files = self.architecture, self.files
        if files.text_encoder.config.get("dim") != arch.text_dim:
            raise ValueError(f"files.text_encoder.config.dim {files.text_encoder.config.get('dim')} must equal "
                             f"architecture.text_dim {arch.text_dim}")
        if files.vae.config.get("z_dim", 16) != arch.in_dim:
            raise ValueError(f"files.vae.config.z_dim {files.vae.config.get('z_dim', 16)} must equal "
                             f"architecture.in_dim {arch.in_dim}")
        self._s2v_checks()
        if not _builds(info):
            return self
        if self.files.lora is not None:
            lora = self.files.lora
            expected = lora_targets(arch.dit_config(), lora.target_modules, strict=False, match=lora.match)
            if not expected:
                where = "a DiT block" if lora.match == "block" else "the DiT (PEFT suffix rule)"
                raise ValueError(f"files.lora.target_modules {list(lora.target_modules)} name no Linear module of {where}")
        self.stream_config()  # the StreamConfig itself validates sampler/schedule/transition combinations
        return self

    def _s2v_checks(self) -> None:
        """variant s2v <-> its own caches, the wav2vec2 folder, a cond cache that holds the cond tokens (torch-free)."""
        arch, stream = self.architecture, self.stream
        variant = MODEL_CACHES.get(stream.policy, ("t2v", None))[0]
        if variant != arch.variant:
            if arch.variant == "s2v":
                raise ValueError(f"architecture.variant s2v runs with its own caches: stream.policy must be one of "
                                 f"{[n for n, (v, _) in MODEL_CACHES.items() if v == 's2v']}, got {stream.policy!r}")
            raise ValueError(f"stream.policy {stream.policy!r} is the cache of architecture.variant {variant}, "
                             f"not {arch.variant}")
        if arch.s2v is None:
            return
        if self.files.audio_encoder is None:
            raise ValueError("architecture.variant s2v needs files.audio_encoder (the wav2vec2 folder)")
        if stream.sampler != "few_step" or stream.schedule != "exact":
            raise ValueError(f"architecture.variant s2v runs sampler few_step, schedule exact; got {stream.sampler}, "
                             f"{stream.schedule}")
        settings = S2VRingSettings.model_validate(stream.policy_settings)
        need = s2v_cond_tokens(self.video.latent_height, self.video.latent_width, arch.s2v.zip_frame_buckets)
        if need > settings.cond_tokens:
            raise ValueError(f"stream.policy_settings.cond_tokens {settings.cond_tokens} cannot hold the {need} cond "
                             f"tokens (reference + FramePack motion) of a {self.video.latent_height}x"
                             f"{self.video.latent_width} latent")

    # --- derived ---------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        """The YAML this spec was read from (None when built in code)."""
        return self._path

    def dit_config(self, **overrides: Any) -> DiTConfig:
        return self.architecture.dit_config(**overrides)

    def require_streamable(self, action: str) -> None:
        """Refuse `action` (serve, render, bench) for a family the engine cannot stream yet: the audio-driven
        s2v DiT is checked, shown and merged, but has no audio-conditioned stream (issue 11 items 5–6)."""
        if self.architecture.variant == "s2v":
            raise ValueError(f"{self.name} is an audio-driven (s2v) family: `streamgen models check/show` know it, "
                             f"but it cannot {action} yet (its audio-conditioned stream is not built)")

    def latent_size(self, size: str | tuple[int, int] | None = None) -> tuple[int, int]:
        """(latent_height, latent_width) for a pixel size "WIDTHxHEIGHT" (or (width, height)); None: the YAML's."""
        if size is None:
            return self.video.latent_height, self.video.latent_width
        parsed = parse_size(size) if isinstance(size, str) else (int(size[0]), int(size[1]))
        if isinstance(parsed, int):
            raise ValueError(f"the model's video size needs both sides, WIDTHxHEIGHT, got {size!r}")
        width, height = parsed
        _, sh, sw = self.video.vae_stride
        _, ph, pw = self.architecture.patch_size
        if height % (sh * ph) or width % (sw * pw):
            raise ValueError(f"size {width}x{height} (WxH): width must be a multiple of {sw * pw} and height of "
                             f"{sh * ph} (VAE stride x patch size)")
        return height // sh, width // sw

    def stream_config(self, latent: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
                      **overrides: Any):
        """The `StreamConfig` this family runs with (latent size from the YAML unless given; fp32 by default)."""
        return self.stream.to_config(latent or (self.video.latent_height, self.video.latent_width), dtype, **overrides)

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
        if f.audio_encoder is not None:
            out.append(("audio_encoder", f.audio_encoder, not f.audio_encoder.optional))
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


def parse_size(text: str) -> int | tuple[int, int]:
    """`--size`, one grammar for every command: "WxH" pixels -> (W, H), or "N" (the longer side) -> N."""
    parts = text.strip().lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise ValueError(f"expected a pixel size WIDTHxHEIGHT such as 832x480 (or N, the longer side), got {text!r}")
    nums = [int(p) for p in parts]
    if min(nums) <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return nums[0] if len(nums) == 1 else (nums[0], nums[1])


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


def load_family_file(path: str | Path, build_checks: bool = True) -> FamilySpec:
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
        spec = FamilySpec.model_validate(data, context={"build": build_checks})
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


def load_all(directory: str | Path | None = None, build_checks: bool = True) -> tuple[list[FamilySpec], list[str]]:
    """Every valid family and the error message of every invalid YAML (`build_checks=False`: without
    the checks that build torch objects, see `_builds`; `models list` is then quick)."""
    specs, errors = [], []
    for path in family_files(directory).values():
        try:
            specs.append(load_family_file(path, build_checks))
        except FamilyConfigError as exc:
            errors.append(str(exc))
    return specs, errors


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


def s2v_cond_tokens(latent_height: int, latent_width: int, buckets: tuple[int, ...]) -> int:
    """Tokens of the S2V cond sequence: the reference (patch 1x2x2) plus FramePack's 1x / 2x / 4x motion
    tokens (kernel = stride (c, 2c, 2c) over bucket frames; models/s2v/motion.py, spec avatar §2.5):
    704x384 pixels (88x48 latent), buckets (1, 2, 16) -> 1056 + 1056 + 264 + 264 = 2640."""
    h, w = latent_height, latent_width
    return (h // 2) * (w // 2) + sum((b // c) * (h // (2 * c)) * (w // (2 * c)) for b, c in zip(buckets, (1, 2, 4)))


def meta_dit(cfg: DiTConfig):
    """The DiT of `cfg` on the meta device (shapes, no memory): `S2VDiT` for an `S2VConfig`, else `WanDiT`."""
    import torch

    from ..models.dit import WanDiT
    from ..models.s2v import S2VConfig, S2VDiT

    with torch.device("meta"):
        return S2VDiT(cfg) if isinstance(cfg, S2VConfig) else WanDiT(cfg)


def lora_targets(cfg: DiTConfig, modules: tuple[str, ...], strict: bool = True,
                 match: Literal["block", "suffix"] = "block") -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of every LoRA target.

    match "block": `modules` are paths inside a DiT block, targeted in every block (LongLive).
    "suffix": PEFT's rule over the whole model, every Linear named m or ending in ".m" (LiveAvatar's
    q,k,v,o,ffn.0,ffn.2: the 40 blocks' attention and FFN and the 12 audio injectors, 448 modules).
    """
    import torch

    from ..models.dit import Block

    if match == "suffix":
        from ..models.s2v import peft_lora_targets

        model = meta_dit(cfg)
        linears = {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        names = [f"{n}.weight" for n in linears]
        unknown = [m for m in modules if not peft_lora_targets(names, (m,))]
        if unknown and strict:
            raise ValueError(f"LoRA target modules {unknown} match no Linear layer of the DiT (PEFT suffix rule)")
        return {t.removesuffix(".weight"): linears[t.removesuffix(".weight")] for t in peft_lora_targets(names, modules)}

    with torch.device("meta"):
        block = Block(cfg, 0)
    linears = {name: tuple(m.weight.shape) for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [m for m in modules if m not in linears]
    if unknown and strict:
        raise ValueError(f"LoRA target modules {unknown} are not Linear layers of a block; known: {sorted(linears)}")
    return {f"blocks.{i}.{m}": linears[m] for i in range(cfg.num_layers) for m in modules if m in linears}
