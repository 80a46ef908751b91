"""Check a local model dir against its family before anything loads: every file, key, shape and LoRA target.

`check_model_dir` reads only headers: safetensors through ``safe_open`` metadata (a shard index:
every shard it names), torch pickles with ``torch.load(mmap=True, map_location="meta",
weights_only=True)`` (storages are memory-mapped and mapped to the meta device: no tensor data is
read), then compares every key and shape with the modules built on the meta device from the YAML.
A LoRA adapter is checked key by key under its family's key rule (`checkpoint.LoraRule`): every key
that would not load (wrong form, a module that is no target, another rank) is named.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.checkpoint import (
    MAX_LISTED,
    CheckpointError,
    is_shard_index,
    listed,
    lora_file_hparams,
    lora_problems,
    normalize_state,
    pick_envelope,
    read_lazy,
    read_sharded,
    resolve_lora_rule,
)
from ..models.config import DiTConfig
from .family import FamilySpec, FileSpec, LoraFile, load_family_config, lora_targets, meta_dit


class ModelDirError(ValueError):
    """A model dir that does not hold what its family needs; the message lists every problem."""


def compare_shapes(got: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], where: str,
                   flexible_rows: frozenset[str] = frozenset()) -> list[str]:
    """One line per problem: missing / unexpected keys (listed), each mis-shaped tensor by name.

    `flexible_rows`: keys whose first dim may be larger than expected (TAEHV TGrow weights the loader trims).
    """
    problems = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        problems.append(f"{where}: {len(missing)} missing key{'s' * (len(missing) > 1)}: {listed(missing)}")
    if unexpected:
        hint = ""
        if any(".attn1." in k or k.startswith("condition_embedder") for k in unexpected):
            hint = " (Diffusers-format WanTransformer3DModel names: convert to the original Wan key names)"
        problems.append(f"{where}: {len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)}{hint}: {listed(unexpected)}")
    misshaped = []
    for key in sorted(set(got) & set(expected)):
        shape, want = tuple(got[key].shape), tuple(expected[key])
        if shape == want or (key in flexible_rows and len(shape) == len(want) and shape[0] >= want[0]
                             and shape[1:] == want[1:]):
            continue
        misshaped.append(f"{where}: {key}: got {shape}, expected {want}")
    problems += misshaped[:MAX_LISTED]
    if len(misshaped) > MAX_LISTED:
        problems.append(f"{where}: ... and {len(misshaped) - MAX_LISTED} more mis-shaped tensors")
    return problems


def _meta_shapes(module_fn) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        module = module_fn()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def expected_dit_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the DiT of `cfg` (WanDiT, or S2VDiT for an S2VConfig), built on the meta device."""
    return {k: tuple(v.shape) for k, v in meta_dit(cfg).state_dict().items()}


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
              "tokenizer": "the umT5 tokenizer folder", "vae": "the Wan2.1 VAE", "taehv": "the TAEHV decoder",
              "audio_encoder": "the wav2vec2 audio encoder folder"}
_DIRS = ("tokenizer", "audio_encoder")  # roles that are folders

# config.json fields that must equal the family's architecture (when the file sets them)
_CONFIG_FIELDS = ("dim", "ffn_dim", "freq_dim", "text_dim", "text_len", "num_heads", "num_layers", "in_dim", "out_dim",
                  "patch_size", "eps", "qk_norm", "cross_attn_norm")
_S2V_CONFIG_FIELDS = ("cond_dim", "audio_dim", "num_audio_token", "audio_inject_layers", "motion_frames")
# the reference's S2V switches as streamgen's S2V DiT implements them (spec avatar §2.1)
S2V_SWITCHES = {"enable_adain": True, "adain_mode": "attn_norm", "zero_timestep": True, "enable_motioner": False,
                "enable_tsm": False, "enable_framepack": True, "framepack_drop_mode": "padd", "add_last_motion": True}




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


class LazyFiles:
    """read_lazy memoized per path, so checking several families reads each header once."""

    def __init__(self) -> None:
        self._cache: dict[Path, Any] = {}

    def __call__(self, path: Path) -> Any:
        if path not in self._cache:
            self._cache[path] = read_lazy(path)
        return self._cache[path]


def check_model_dir(family: str | Path | FamilySpec, model_dir: str | Path, decoder: str | None = "vae",
                    _reader: LazyFiles | None = None) -> CheckReport:
    """Check that `model_dir` holds every file `family` needs, with the right keys and shapes.

    Reads headers only (see `read_lazy`). `decoder` ("vae" | "taehv") makes that decoder's file
    required and the other optional, "preview" neither; None follows the YAML's `optional` flags.
    """
    import torch

    spec = load_family_config(family)
    model_dir = Path(model_dir)
    reader = _reader or LazyFiles()
    report = CheckReport(spec, model_dir, [])
    if not model_dir.is_dir():
        report.files.append(FileCheck("dir", True, None, problems=[f"model dir {model_dir} does not exist"]))
        return report
    dit_cfg = spec.dit_config()
    for role, fspec, required in spec.file_specs(decoder):
        found = _find(model_dir, fspec, want_dir=role in _DIRS)
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
                shards = ""
                if is_shard_index(found):
                    obj, shard_problems = read_sharded(found, reader)
                    check.problems += [f"{where}: {p}" for p in shard_problems[:MAX_LISTED]]
                    if len(shard_problems) > MAX_LISTED:
                        check.problems.append(f"{where}: ... and {len(shard_problems) - MAX_LISTED} more shard problems")
                    shards = f" in {len(set(json.loads(found.read_text())['weight_map'].values()))} shards"
                else:
                    obj = reader(found)
                state, env = pick_envelope(obj, spec.files.dit.envelope, where)
                state = normalize_state(state, where)
                expected = expected_dit_shapes(dit_cfg)
                check.problems += compare_shapes(state, expected, where)
                if spec.files.dit.config_json is not None:
                    check.problems += _check_config_json(model_dir, spec.files.dit.config_json, dit_cfg, spec.title)
                params = sum(math.prod(s.shape) for s in state.values())
                check.summary = f"[{env}] {len(state)} tensors{shards}, {_dtypes(state)}, {params:,} params"
                if env == "flat" and "flat" not in spec.files.dit.envelope:
                    report.warnings.append(f"{where}: a flat state dict, used as is (the release has "
                                           f"envelope {spec.files.dit.envelope_text})")
            elif role == "lora":
                problems, check.summary = _check_lora(reader(found), spec, where, lora_file_hparams(found))
                check.problems += problems
            elif role == "audio_encoder":
                problems, check.summary = _check_audio_encoder(found, spec, where, reader)
                check.problems += problems
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


def _check_config_json(model_dir: Path, rel: str, cfg: DiTConfig, title: str) -> list[str]:
    """The DiT's own config.json against the family's architecture (fields it sets) and, for S2V, the
    reference switches the S2V DiT implements."""
    from ..models.s2v import S2VConfig

    path = model_dir / rel
    if not path.is_file():
        return [f"{title} needs {rel} (the DiT's config.json) in {model_dir}: not found"]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{rel}: cannot read the DiT config: {exc}"]
    if not isinstance(data, dict):
        return [f"{rel}: a config.json is a mapping, got {type(data).__name__}"]

    def norm(value: Any) -> Any:
        return tuple(norm(v) for v in value) if isinstance(value, (list, tuple)) else value

    s2v = isinstance(cfg, S2VConfig)
    problems = [f"{rel}: {name} {data[name]!r}, the family's architecture has {getattr(cfg, name)!r}"
                for name in _CONFIG_FIELDS + (_S2V_CONFIG_FIELDS if s2v else ())
                if name in data and norm(data[name]) != norm(getattr(cfg, name))]
    if s2v:
        problems += [f"{rel}: {name} {data[name]!r}: streamgen's S2V DiT implements {name} {want!r} only"
                     for name, want in S2V_SWITCHES.items() if name in data and data[name] != want]
    return problems


def _check_audio_encoder(folder: Path, spec: FamilySpec, where: str, reader: LazyFiles) -> tuple[list[str], str]:
    """The wav2vec2 folder: its files, config.json against the S2V audio sizes, the weights' layers (headers)."""
    fs, s2v = spec.files.audio_encoder, spec.architecture.s2v
    assert fs is not None
    problems = []
    missing = [n for n in fs.files if not (folder / n).is_file()]
    if missing:
        problems.append(f"{where}: wav2vec2 folder lacks {', '.join(missing)}")
    hidden = layers = None
    if (folder / "config.json").is_file():
        try:
            data = json.loads((folder / "config.json").read_text())
            hidden, layers = data.get("hidden_size"), data.get("num_hidden_layers")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            problems.append(f"{where}/config.json: cannot read: {exc}")
        if s2v is not None and hidden is not None and hidden != s2v.audio_dim:
            problems.append(f"{where}/config.json: hidden_size {hidden}, the S2V audio encoder takes {s2v.audio_dim}-wide "
                            "features (architecture.s2v.audio_dim)")
        if s2v is not None and layers is not None and layers + 1 != s2v.audio_layers:
            problems.append(f"{where}/config.json: num_hidden_layers {layers} gives {layers + 1} hidden states, the S2V "
                            f"audio encoder weighs {s2v.audio_layers} (architecture.s2v.audio_layers)")
    weights = next((folder / w for w in fs.weights if (folder / w).is_file()), None)
    if weights is None:
        problems.append(f"{where}: no wav2vec2 weights (looked for {', '.join(fs.weights)})")
        return problems, ""
    rel = f"{where}/{weights.relative_to(folder)}"
    try:
        state, _ = pick_envelope(reader(weights), "flat", rel)
    except CheckpointError as exc:
        return problems + [str(exc)], ""
    found = {int(m[1]) for k in state if (m := re.search(r"encoder\.layers\.(\d+)\.", str(k)))}
    if not found:
        problems.append(f"{rel}: no encoder.layers.N tensors: not a wav2vec2 checkpoint")
    elif layers is not None and found != set(range(layers)):
        problems.append(f"{rel}: encoder layers {min(found)}..{max(found)} ({len(found)}), config.json says "
                        f"num_hidden_layers {layers}")
    width = s2v.audio_dim if s2v is not None else hidden
    q0 = [k for k in state if str(k).endswith("encoder.layers.0.attention.q_proj.weight")]
    if width is not None and q0 and tuple(state[q0[0]].shape) != (width, width):
        problems.append(f"{rel}: {q0[0]}: got {tuple(state[q0[0]].shape)}, expected {(width, width)}")
    return problems, f"{weights.name}: {len(state)} tensors, {_dtypes(state)}, {len(found)} layers x {width}"


def _check_lora(obj: Any, spec: FamilySpec, where: str, declared: Mapping[str, float]) -> tuple[list[str], str]:
    """Every adapter key against the family's key rule and the DiT's LoRA targets (`lora_problems`): keys of
    another form, for modules that are no target, incomplete pairs, another rank, uncovered targets; the
    rank / alpha the file declares must equal the YAML's. Returns (problems, summary)."""
    import torch

    lora = spec.files.lora
    assert lora is not None
    if not isinstance(obj, dict):
        return [f"{where}: holds a {type(obj).__name__}, expected a dict"], ""
    adapter = obj if lora.key is None else obj.get(lora.key, obj)
    if not isinstance(adapter, dict) or not adapter:
        return [f"{where}: no LoRA adapter (entry {lora.key!r} missing or empty; entries: {sorted(map(str, obj))})"], ""
    bad = sorted(str(k) for k, v in adapter.items() if not isinstance(v, torch.Tensor))
    if bad:
        return [f"{where}: no LoRA adapter at {lora.key!r}: non-tensor entries {listed(bad)}"], ""
    targets = lora_targets(spec.dit_config(), lora.target_modules, match=lora.match)
    rule = lora.rule(targets)
    problems = []
    try:
        resolve_lora_rule(rule, declared, where)
    except CheckpointError as exc:
        problems.append(str(exc))
    pairs, found = lora_problems(adapter, rule, targets)
    problems += [f"{where}: {p}" for p in found[:MAX_LISTED]]
    if len(found) > MAX_LISTED:
        problems.append(f"{where}: ... and {len(found) - MAX_LISTED} more LoRA problems")
    summary = "" if problems else (f"rank {lora.rank}, alpha {lora.alpha:g} (scale {lora.scale:g}), {len(adapter)} "
                                   f"tensors for {len(pairs)} of {len(targets)} target modules")
    return problems, summary
