"""Load Wan causal DiT checkpoints by their real key names and merge PEFT LoRA adapters.

Self-Forcing, CausVid, LongLive, Rolling Forcing and Reward Forcing all ship the same
``CausalWanModel`` weights, but wrapped differently: a training envelope
(``generator_ema`` / ``generator`` / ``model``), FSDP / activation-checkpoint / compile
wrapper segments in the key names, and for LongLive a separate PEFT LoRA adapter. LiveAvatar
ships the stock Wan2.2-S2V-14B weights as Hugging Face shards (``*.safetensors.index.json``)
plus a PEFT adapter whose keys carry the adapter name (``.lora_A.default.weight``, `LoraRule`).
This module strips all of that so the result loads with ``model.load_state_dict(strict=True)``,
and fails loudly (listing every problem) instead of silently loading the wrong tensors.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

logger = logging.getLogger(__name__)

_ENVELOPES = ("generator_ema", "generator", "model")
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin"})
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
LORA_PREFIX = "base_model.model."
# any PEFT LoRA key: optional prefix, module, A/B, optional adapter name (`.default`), `.weight`
_LORA_ANY = re.compile(r"^(?P<prefix>base_model\.model\.)?(?P<module>.+?)\.lora_(?P<part>[AB])"
                       r"(?:\.(?P<adapter>[^.]+))?\.weight$")
SHARD_INDEX_SUFFIX = ".index.json"
MAX_LISTED = 20


def listed(items: list[str], limit: int = 10) -> str:
    """The first `limit` items of a long problem list, with a count of the rest."""
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


class CheckpointError(ValueError):
    """A checkpoint or adapter that cannot be loaded as-is; the message lists every problem."""


def _format_list(title: str, items: list[str]) -> list[str]:
    """Render one problem category, capped so huge mismatches stay readable."""
    lines = [f"{title} ({len(items)}):"]
    lines += [f"  {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more")
    return lines


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """A reader failure said by what the file is (its first bytes), not by the reader's internals:
    a torch loader given a text file fails with e.g. "KeyError: 101", which names no problem."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        size = path.stat().st_size
    except OSError as err:
        return CheckpointError(f"cannot read checkpoint {path}: {err}")
    if size == 0:
        what = "an empty file"
    elif path.suffix.lower() == ".safetensors":
        what = "not a safetensors file, or a truncated one"
    elif head == b"PK":
        what = "a torch (zip) checkpoint that is truncated or damaged"
    elif head[:1] == b"\x80":
        what = "a legacy torch (pickle) checkpoint that is truncated, damaged or holds more than tensors"
    else:
        what = "not a torch checkpoint (neither a zip archive nor a pickle)"
    detail = (str(exc).strip().splitlines() or [""])[0][:160]
    return CheckpointError(f"cannot read checkpoint {path} ({size:,} bytes): {what} [{type(exc).__name__}: {detail}]")


def read_tensors(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file into a dict without executing pickled code.

    ``.safetensors`` goes through safetensors; ``.pt``/``.pth``/``.bin`` go through
    ``torch.load(weights_only=True)`` so an untrusted checkpoint cannot run code; a shard index
    (``*.safetensors.index.json``) reads every shard it names (`read_sharded`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if is_shard_index(path):
        return _strict_shards(path, read_tensors)
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(
            f"unknown checkpoint suffix {suffix!r} for {path}; "
            f"expected .safetensors, {', '.join(sorted(_TORCH_SUFFIXES))}"
        )
    try:
        if suffix == ".safetensors":
            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def unwrap_envelope(obj: dict, prefer_ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """Pick the generator weights out of a training envelope.

    Trainers save ``{"generator_ema", "generator", "critic", ...}``; the EMA weights are
    the ones meant for inference, so they win unless ``prefer_ema`` is False. A flat
    state dict (all values tensors) is returned as ``"<flat>"``.
    """
    candidates = _ENVELOPES if prefer_ema else _ENVELOPES[1:]
    name = next((key for key in candidates if key in obj), "<flat>")
    state = obj if name == "<flat>" else obj[name]
    if not isinstance(state, dict):
        raise CheckpointError(f"envelope {name!r} holds a {type(state).__name__}, expected a dict")
    non_tensors = sorted(str(key) for key, value in state.items() if not isinstance(value, Tensor))
    if non_tensors:
        raise CheckpointError(
            "\n".join(
                [f"no usable state dict: envelope {name!r} has non-tensor entries "
                 f"(known envelopes: {', '.join(candidates)})"]
                + _format_list("non-tensor keys", non_tensors)
            )
        )
    logger.info("checkpoint envelope picked: %s (%d tensors)", name, len(state))
    return state, name


def normalize_key(key: str) -> str:
    """Map a wrapped key name to the plain ``CausalWanModel`` parameter name.

    Drops every FSDP / activation-checkpoint / ``torch.compile`` wrapper segment, one
    leading ``module.`` (DDP) and then one leading ``model.`` (the trainer's attribute).
    """
    key = ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)
    key = key.removeprefix("module.")
    return key.removeprefix("model.")


def check_state_dict(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise if ``state`` does not match ``expected`` exactly, naming every offending key.

    Strict loading errors from torch stop at the first shape mismatch; this reports all
    missing, unexpected and mis-shaped keys at once.
    """
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(
        f"{key}: got {tuple(state[key].shape)}, expected {tuple(expected[key])}"
        for key in expected.keys() & state.keys()
        if tuple(state[key].shape) != tuple(expected[key])
    )
    if not (missing or unexpected or misshaped):
        return
    lines = [
        f"state dict does not match the model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped"
    ]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            lines += _format_list(title, items)
    raise CheckpointError("\n".join(lines))


def load_lora(path_or_obj: str | Path | Mapping[str, Any], key: str | None = "generator_lora") -> dict[str, Tensor]:
    """Return the generator's LoRA adapter dict from LongLive's ``lora.pt`` (or a loaded dict).

    The trainer saves ``{"generator_lora", "critic_lora", "step"}``; only the generator
    adapter applies at inference, so ``critic_lora`` and ``step`` are ignored. A file
    without ``generator_lora`` is treated as a bare adapter dict. `key`: the adapter's entry
    (None: the file is the bare adapter, as LiveAvatar's ``liveavatar.safetensors``).
    """
    obj = path_or_obj if isinstance(path_or_obj, Mapping) else read_tensors(path_or_obj)
    adapter = obj if key is None else obj.get(key, obj)
    if not isinstance(adapter, Mapping):
        raise CheckpointError(f"LoRA {key!r} holds a {type(adapter).__name__}, expected a dict")
    non_tensors = sorted(str(k) for k, value in adapter.items() if not isinstance(value, Tensor))
    if non_tensors:
        raise CheckpointError("\n".join(["LoRA adapter has non-tensor entries"]
                                        + _format_list("non-tensor keys", non_tensors)))
    if not adapter:
        raise CheckpointError("LoRA adapter is empty")
    return dict(adapter)


@dataclass(frozen=True)
class LoraRule:
    """Which adapter keys load, and how the adapter merges: ``W <- W + (alpha / r) * B @ A``.

    Keys are ``base_model.model.<module>.lora_{A|B}[.<adapter>].weight``. The reference loaders load
    by exact name (LiveAvatar: ``load_state_dict(strict=False)`` into the PEFT model), so a key of any
    other form, or for a module that is not a target, would silently not load there; here it is an
    error that names the key.

    adapter: the PEFT adapter name the keys carry (LiveAvatar: ``default``, the PEFT model's own
        parameter names); None: no adapter segment (LongLive).
    prefix_optional: the keys may all lack ``base_model.model.`` (LiveAvatar prepends it to every key
        when the file's first key lacks it, so every key must agree with the first).
    rank, alpha: the configured r and lora_alpha (None: r from the tensor shapes, alpha = r).
    targets: the modules that must each get exactly one A/B pair (None: any module of the state dict).
    """

    rank: int | None = None
    alpha: float | None = None
    adapter: str | None = None
    prefix_optional: bool = False
    targets: frozenset[str] | None = None

    @property
    def key_form(self) -> str:
        prefix = f"[{LORA_PREFIX}]" if self.prefix_optional else LORA_PREFIX
        return f"{prefix}<module>.lora_{{A|B}}{'.' + self.adapter if self.adapter else ''}.weight"

    def key(self, module: str, part: str) -> str:
        """The (prefixed) key of `module`'s lora_A / lora_B under this rule."""
        return f"{LORA_PREFIX}{module}.lora_{part}{'.' + self.adapter if self.adapter else ''}.weight"

    def scale(self, rank: int) -> float:
        """alpha / r; r is the configured rank when there is one, else the tensors' `rank`."""
        r = self.rank or rank
        return (r if self.alpha is None else self.alpha) / r


def parse_lora_keys(keys: Iterable[str], rule: LoraRule) -> tuple[dict[str, dict[str, str]], list[str], list[str]]:
    """({module: {"A": key, "B": key}}, keys not of the rule's form, other per-key problems).

    Module names are normalized (`normalize_key`). With `prefix_optional`, a key whose prefix
    disagrees with the first key's (in the given order, as the reference reads the file) is a problem.
    """
    keys = [str(k) for k in keys]
    first_prefixed = bool(keys) and keys[0].startswith(LORA_PREFIX)
    pairs: dict[str, dict[str, str]] = {}
    foreign: list[str] = []
    problems: list[str] = []
    for key in sorted(keys):
        m = _LORA_ANY.match(key)
        if m is None or m["adapter"] != rule.adapter or (m["prefix"] is None and not rule.prefix_optional):
            foreign.append(key)
            continue
        if rule.prefix_optional and (m["prefix"] is not None) != first_prefixed:
            has = m["prefix"] is not None
            problems.append(f"{key}: {'has' if has else 'lacks'} the {LORA_PREFIX} prefix that the file's first key "
                            f"{keys[0]} {'lacks' if has else 'has'}: it would not load")
            continue
        module, part = normalize_key(m["module"]), m["part"]
        if part in pairs.setdefault(module, {}):
            problems.append(f"{key}: duplicate lora_{part} for {module} ({pairs[module][part]})")
            continue
        pairs[module][part] = key
    return pairs, foreign, problems


def lora_problems(adapter: Mapping[str, Any], rule: LoraRule, weights: Mapping[str, tuple[int, ...]]
                  ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The adapter's pairs and one line per reason it would not merge exactly as configured.

    `weights`: {module: weight shape} of the model (a state dict's ``*.weight`` entries, or the
    LoRA-targetable Linear layers); `adapter` values need only ``.shape`` (meta tensors do).
    Problems: keys not of the rule's form, duplicates, keys for modules that are not targets
    (`rule.targets`) or not in `weights`, incomplete pairs, a rank other than `rule.rank`, shapes
    that do not fit the weight, targets without a pair.
    """
    pairs, foreign, problems = parse_lora_keys(adapter, rule)
    problems = [f"{key}: not {rule.key_form} (it would not load)" for key in foreign] + problems
    ranks: dict[int, int] = {}  # rank found -> pairs with it, when it is not the configured one
    for module in sorted(pairs):
        parts = pairs[module]
        if rule.targets is not None and module not in rule.targets:
            problems += [f"{key}: {module} is not a LoRA target of this model (it would not load)"
                         for key in sorted(parts.values())]
            continue
        if module not in weights:
            problems.append(f"{module}: base weight {module}.weight not in state dict")
            continue
        if parts.keys() != {"A", "B"}:
            problems.append(f"{module}: incomplete pair, {'lora_B' if 'A' in parts else 'lora_A'} missing "
                            f"(have {next(iter(parts.values()))})")
            continue
        a, b, w = tuple(adapter[parts["A"]].shape), tuple(adapter[parts["B"]].shape), tuple(weights[module])
        if len(w) != 2:
            problems.append(f"{module}: base weight {module}.weight has shape {w}, not a Linear weight [out, in]")
        elif rule.rank is not None:
            want = {"A": (rule.rank, w[1]), "B": (w[0], rule.rank)}
            bad = [f"{parts[p]}: got {got}, expected {want[p]} (rank {rule.rank})"
                   for p, got in (("A", a), ("B", b)) if got != want[p]]
            if bad and a and a[0] != rule.rank:
                ranks[a[0]] = ranks.get(a[0], 0) + 1
            problems += bad
        elif len(a) != 2 or len(b) != 2 or a[0] != b[1] or w != (b[0], a[1]):
            problems.append(f"{module}: shapes inconsistent, lora_A {a}, lora_B {b}, "
                            f"weight {w} (need A [r, in], B [out, r], W [out, in])")
    if ranks:
        found = ", ".join(f"rank {r} in {n}" for r, n in sorted(ranks.items()))
        problems.insert(0, f"adapter rank is not the configured rank {rule.rank}: {found} of {len(pairs)} "
                           "adapter modules")
    if rule.targets is not None:
        missing = sorted(rule.targets - set(pairs))
        if missing:
            problems.append(f"no adapter for {len(missing)} of {len(rule.targets)} target modules: {listed(missing)}")
    return pairs, problems


def merge_lora(state: dict[str, Tensor], lora: dict[str, Tensor], alpha: float | None = None,
               rule: LoraRule | None = None) -> dict[str, Tensor]:
    """Fold a PEFT LoRA into the base weights: ``W <- W + (alpha / r) * B @ A``.

    Merging once at load time gives the same outputs as the unmerged adapter at no per-step cost.
    `rule` says which keys load and the configured rank / alpha (default: LongLive's form; the
    rank from the tensor shapes). `alpha` (when given) overrides the rule's; without either it
    is ``r`` (LongLive's config default): scale 1. The product is formed in float64 so bf16
    checkpoints do not pick up extra rounding. Every problem (see `lora_problems`) is raised at
    once. Returns a new dict; ``state`` is not modified (unmerged entries are the same tensors).
    """
    rule = rule or LoraRule()
    if alpha is not None:
        rule = replace(rule, alpha=alpha)
    weights = {key.removesuffix(".weight"): tuple(value.shape)
               for key, value in state.items() if key.endswith(".weight")}
    pairs, problems = lora_problems(lora, rule, weights)
    if problems:
        raise CheckpointError("\n".join([f"cannot merge LoRA: {len(problems)} problem(s)"]
                                        + _format_list("problems", problems)))
    merged = dict(state)
    for module, parts in pairs.items():
        a, b = lora[parts["A"]].double(), lora[parts["B"]].double()
        weight = state[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.double() + rule.scale(a.shape[0]) * (b @ a)).to(weight.dtype)
    return merged


_META_RANK = ("r", "lora_rank", "rank")
_META_ALPHA = ("lora_alpha", "alpha")


def lora_file_hparams(path: str | Path) -> dict[str, float]:
    """The rank / alpha a LoRA file declares itself ({"rank": r, "alpha": a}, either may be absent): the
    safetensors header metadata (``r`` | ``lora_rank`` | ``rank``, ``lora_alpha`` | ``alpha``). Header only."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any reader failure is a problem with this file
        raise _unreadable(path, exc) from None
    out: dict[str, float] = {}
    for name, keys in (("rank", _META_RANK), ("alpha", _META_ALPHA)):
        key = next((k for k in keys if k in meta), None)
        if key is None:
            continue
        try:
            out[name] = float(meta[key])
        except ValueError:
            raise CheckpointError(f"{path}: header metadata {key}={meta[key]!r} is not a number") from None
    return out


def resolve_lora_rule(rule: LoraRule, declared: Mapping[str, float], where: str) -> LoraRule:
    """`rule` with the rank / alpha the file declares (`lora_file_hparams`) filling what it leaves open;
    a file that declares other values than the configured ones is refused (which scale would be right?)."""
    changes: dict[str, Any] = {}
    problems = []
    for name in ("rank", "alpha"):
        if name not in declared:
            continue
        mine = getattr(rule, name)
        if mine is None:
            changes[name] = int(declared[name]) if name == "rank" else float(declared[name])
        elif float(mine) != float(declared[name]):
            problems.append(f"{name} {mine:g} configured, the file declares {declared[name]:g}")
    if problems:
        raise CheckpointError(f"{where}: LoRA hyper-parameters disagree: {'; '.join(problems)}")
    return replace(rule, **changes)


def _normalize_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Apply ``normalize_key`` to every key, refusing to let two raw keys collapse into one."""
    sources: dict[str, list[str]] = {}
    for raw in state:
        sources.setdefault(normalize_key(raw), []).append(raw)
    collisions = sorted(f"{name} <- {', '.join(raws)}" for name, raws in sources.items() if len(raws) > 1)
    if collisions:
        raise CheckpointError("\n".join(["several checkpoint keys normalize to the same name"]
                                        + _format_list("collisions", collisions)))
    return {name: state[raws[0]] for name, raws in sources.items()}


def load_dit_weights(
    path: str | Path,
    expected: dict[str, tuple[int, ...]],
    *,
    prefer_ema: bool = True,
    lora_path: str | Path | None = None,
    lora_alpha: float | None = None,
    lora_rule: LoraRule | None = None,
    lora_key: str | None = "generator_lora",
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Load a causal-DiT checkpoint into a clean state dict for ``load_state_dict(strict=True)``.

    Unwraps the envelope (a shard index: every shard), normalizes key names, optionally merges a
    LoRA adapter (`lora_rule`: key form, targets, rank / alpha; the file's own declared rank / alpha
    fill what the rule leaves open and must agree with what it sets; `lora_alpha` overrides),
    verifies every key and shape against ``expected``, and casts floating tensors to ``dtype``.
    """
    state, _ = unwrap_envelope(read_tensors(path), prefer_ema=prefer_ema)
    state = _normalize_keys(state)
    if lora_path is not None:
        rule = lora_rule or LoraRule()
        if lora_alpha is not None:
            rule = replace(rule, alpha=lora_alpha)
        rule = resolve_lora_rule(rule, lora_file_hparams(lora_path), str(lora_path))
        state = merge_lora(state, load_lora(lora_path, key=lora_key), rule=rule)
    check_state_dict(state, expected)
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    return state


# -------------------------------------------------------------- sharded checkpoints (index + shards)
def is_shard_index(path: str | Path) -> bool:
    """A Hugging Face shard index (``diffusion_pytorch_model.safetensors.index.json``): its
    ``weight_map`` names the shard file of every tensor."""
    return Path(path).name.lower().endswith(SHARD_INDEX_SUFFIX)


def shard_index(path: str | Path) -> dict[str, str]:
    """{tensor name: shard file (relative to the index's folder)}; a malformed index raises naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read shard index {path}: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise CheckpointError(f"{path}: not a shard index (needs a non-empty \"weight_map\": "
                              "{tensor name: shard file})")
    bad = sorted({v for v in weight_map.values() if not v or Path(v).is_absolute() or ".." in Path(v).parts})
    if bad:
        raise CheckpointError(f"{path}: shard files must lie beside the index: {listed(bad)}")
    return dict(weight_map)


def read_sharded(path: str | Path, read_one: Callable[[Path], Any]) -> tuple[dict[str, Any], list[str]]:
    """Every tensor of the shards an index names (each shard read with `read_one`: `read_lazy` for
    headers, `read_tensors` for data) and one line per disagreement between index and shards: a
    missing or unreadable shard, a tensor the index places in a shard that lacks it, a tensor a shard
    holds that the index does not place there, one tensor in two shards. Loaders (diffusers) load
    every tensor of every listed shard, so the union is what would load."""
    path = Path(path)
    weight_map = shard_index(path)
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    problems: list[str] = []
    for shard in sorted(by_shard):
        file = path.parent / shard
        if not file.is_file():
            problems.append(f"shard {shard} (holds {len(by_shard[shard])} tensors of the index) not found")
            continue
        try:
            obj = read_one(file)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            problems.append(f"shard {shard}: not a flat dict of tensors")
            continue
        absent = sorted(by_shard[shard] - set(obj))
        if absent:
            problems.append(f"shard {shard} lacks {len(absent)} tensor{'s' * (len(absent) > 1)} the index places "
                            f"there: {listed(absent)}")
        for key, value in obj.items():
            if key in owner:
                problems.append(f"{key}: in shards {owner[key]} and {shard}")
                continue
            if weight_map.get(key) != shard:
                where = f"the index places it in {weight_map[key]}" if key in weight_map else "it is not in the index"
                problems.append(f"{key}: in shard {shard}, but {where}")
            out[key], owner[key] = value, shard
    return out, problems


def _strict_shards(path: Path, read_one: Callable[[Path], Any]) -> dict[str, Any]:
    out, problems = read_sharded(path, read_one)
    if problems:
        raise CheckpointError("\n".join([f"{path}: index and shards disagree"] + _format_list("problems", problems)))
    return out


# -------------------------------------------------------------- headers (no tensor data read)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_lazy(path: str | Path) -> Any:
    """The checkpoint's structure with every tensor on the meta device (shape and dtype, no data).

    safetensors: header only (``safe_open`` metadata). Torch zip pickles: ``torch.load(mmap=True,
    map_location="meta", weights_only=True)`` — storages are memory-mapped, never read. Legacy
    (non-zip) pickles cannot be mapped: ``map_location="meta"`` still streams the file once but keeps
    nothing. Untrusted pickles run no code (weights_only). A shard index: every shard's header.
    """
    path = Path(path)
    if is_shard_index(path):
        return _strict_shards(path, read_lazy)
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
        raise _unreadable(path, exc) from None


def pick_envelope(obj: Any, envelope: str | tuple[str, ...], where: str) -> tuple[dict[str, Any], str]:
    """The weights dict inside a checkpoint: the first declared envelope present, or the file itself when flat.

    A flat file (all values tensors: any safetensors, Reward Forcing's .pt) is accepted whatever is
    declared. A file with envelopes must hold a declared one: picking another silently would run
    e.g. non-EMA weights where the release is meant to run its EMA ones.
    """
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
        raise CheckpointError(f"{where}: envelope {envelope!r} has non-tensor entries: {listed(non_tensors)}")
    return state, envelope


def normalize_state(state: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Apply `checkpoint.normalize_key` (strip model., FSDP/compile segments) refusing collisions."""
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    collisions = []
    for raw, value in state.items():
        key = normalize_key(str(raw))
        if key in out:
            collisions.append(f"{key} <- {sources[key]}, {raw}")
        out[key], sources[key] = value, str(raw)
    if collisions:
        raise CheckpointError(f"{where}: several keys normalize to the same name: {listed(collisions)}")
    return out
