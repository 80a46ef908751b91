"""Check a local model dir against its family before anything loads: every file, key, shape and LoRA target.

`check_model_dir` reads only headers: safetensors through ``safe_open`` metadata and torch pickles
with ``torch.load(mmap=True, map_location="meta", weights_only=True)`` (storages are memory-mapped
and mapped to the meta device: no tensor data is read), then compares every key and shape with the
modules built on the meta device from the YAML.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.checkpoint import (
    LORA_KEY,
    MAX_LISTED,
    CheckpointError,
    listed,
    normalize_key,
    normalize_state,
    pick_envelope,
    read_lazy,
)
from ..models.config import DiTConfig
from .family import FamilySpec, FileSpec, LoraFile, load_family_config, lora_targets


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

    lora = spec.files.lora
    assert lora is not None
    if not isinstance(obj, dict):
        return [f"{where}: holds a {type(obj).__name__}, expected a dict"]
    adapter = obj.get(lora.key, obj)
    if not isinstance(adapter, dict) or not adapter:
        return [f"{where}: no LoRA adapter (entry {lora.key!r} missing or empty; entries: {sorted(map(str, obj))})"]
    bad = sorted(str(k) for k, v in adapter.items() if not isinstance(v, torch.Tensor))
    if bad:
        return [f"{where}: no LoRA adapter at {lora.key!r}: non-tensor entries {listed(bad)}"]
    targets = lora_targets(spec.dit_config(), lora.target_modules)
    problems, pairs, foreign = [], {}, []
    for key, value in adapter.items():
        m = LORA_KEY.match(str(key))
        if m is None:
            foreign.append(str(key))
            continue
        pairs.setdefault(normalize_key(m["module"]), {})[m["part"]] = value
    if foreign:
        problems.append(f"{where}: {len(foreign)} keys are not base_model.model.<module>.lora_{{A|B}}.weight: {listed(foreign)}")
    unknown = sorted(set(pairs) - set(targets))
    missing = sorted(set(targets) - set(pairs))
    if unknown:
        problems.append(f"{where}: adapter for {len(unknown)} modules that are not LoRA targets of this DiT: {listed(unknown)}")
    if missing:
        problems.append(f"{where}: no adapter for {len(missing)} of {len(targets)} target modules: {listed(missing)}")
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
    problems += [p if p.startswith(where) else f"{where}: {p}" for p in shape_problems[:MAX_LISTED]]
    if len(shape_problems) > MAX_LISTED:
        problems.append(f"{where}: ... and {len(shape_problems) - MAX_LISTED} more LoRA shape problems")
    return problems
