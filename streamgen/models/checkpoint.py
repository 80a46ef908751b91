"""Load Wan2.1 causal DiT checkpoints by their real key names and merge LongLive's LoRA.

Self-Forcing, CausVid, LongLive, Rolling Forcing and Reward Forcing all ship the same
``CausalWanModel`` weights, but wrapped differently: a training envelope
(``generator_ema`` / ``generator`` / ``model``), FSDP / activation-checkpoint / compile
wrapper segments in the key names, and for LongLive a separate PEFT LoRA adapter. This
module strips all of that so the result loads with ``model.load_state_dict(strict=True)``,
and fails loudly (listing every problem) instead of silently loading the wrong tensors.
"""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Mapping
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
    ``torch.load(weights_only=True)`` so an untrusted checkpoint cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
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


def load_lora(path_or_obj: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """Return the generator's LoRA adapter dict from LongLive's ``lora.pt`` (or a loaded dict).

    The trainer saves ``{"generator_lora", "critic_lora", "step"}``; only the generator
    adapter applies at inference, so ``critic_lora`` and ``step`` are ignored. A file
    without ``generator_lora`` is treated as a bare adapter dict.
    """
    obj = path_or_obj if isinstance(path_or_obj, Mapping) else read_tensors(path_or_obj)
    adapter = obj.get("generator_lora", obj)
    if not isinstance(adapter, Mapping):
        raise CheckpointError(f"LoRA 'generator_lora' holds a {type(adapter).__name__}, expected a dict")
    non_tensors = sorted(str(key) for key, value in adapter.items() if not isinstance(value, Tensor))
    if non_tensors:
        raise CheckpointError("\n".join(["LoRA adapter has non-tensor entries"]
                                        + _format_list("non-tensor keys", non_tensors)))
    if not adapter:
        raise CheckpointError("LoRA adapter is empty")
    return dict(adapter)


def _pair_lora(lora: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Group adapter tensors by target module (``{module: {"A": ..., "B": ...}}``)."""
    pairs: dict[str, dict[str, Tensor]] = {}
    problems: list[str] = []
    for key in sorted(lora):
        match = LORA_KEY.match(key)
        if match is None:
            problems.append(f"{key}: not base_model.model.<module>.lora_{{A|B}}.weight")
            continue
        module = normalize_key(match["module"])
        if match["part"] in pairs.setdefault(module, {}):
            problems.append(f"{key}: duplicate lora_{match['part']} for {module}")
        pairs[module][match["part"]] = lora[key]
    return pairs, problems


def _check_lora_pair(module: str, pair: dict[str, Tensor], state: dict[str, Tensor]) -> str | None:
    """Return why ``pair`` cannot be merged into ``state``, or None if it can."""
    if pair.keys() != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        return f"{module}: incomplete pair, {missing} missing"
    weight_key = f"{module}.weight"
    if weight_key not in state:
        return f"{module}: base weight {weight_key} not in state dict"
    a, b, w = pair["A"], pair["B"], state[weight_key]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or tuple(w.shape) != (b.shape[0], a.shape[1]):
        return (f"{module}: shapes inconsistent, lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                f"weight {tuple(w.shape)} (need A [r, in], B [out, r], W [out, in])")
    return None


def merge_lora(state: dict[str, Tensor], lora: dict[str, Tensor], alpha: float | None = None) -> dict[str, Tensor]:
    """Fold a PEFT LoRA into the base weights: ``W <- W + (alpha / r) * B @ A``.

    Merging once at load time gives the same outputs as LongLive's unmerged adapter at no
    per-step cost. The rank ``r`` comes from the tensor shapes and ``alpha`` defaults to
    ``r`` (LongLive's config default), since neither is stored in ``lora.pt``. The product
    is formed in float64 so bf16 checkpoints do not pick up extra rounding. Returns a new
    dict; ``state`` is not modified.
    """
    pairs, problems = _pair_lora(lora)
    problems += [p for module, pair in pairs.items() if (p := _check_lora_pair(module, pair, state))]
    if problems:
        raise CheckpointError("\n".join([f"cannot merge LoRA: {len(problems)} problem(s)"]
                                        + _format_list("problems", problems)))
    merged = dict(state)
    for module, pair in pairs.items():
        a, b = pair["A"].double(), pair["B"].double()
        rank = a.shape[0]
        scale = (rank if alpha is None else alpha) / rank
        weight = state[f"{module}.weight"]
        merged[f"{module}.weight"] = (weight.double() + scale * (b @ a)).to(weight.dtype)
    return merged


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
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Load a causal-DiT checkpoint into a clean state dict for ``load_state_dict(strict=True)``.

    Unwraps the envelope, normalizes key names, optionally merges a LoRA adapter, verifies
    every key and shape against ``expected``, and casts floating tensors to ``dtype``.
    """
    state, _ = unwrap_envelope(read_tensors(path), prefer_ema=prefer_ema)
    state = _normalize_keys(state)
    if lora_path is not None:
        state = merge_lora(state, load_lora(lora_path), alpha=lora_alpha)
    check_state_dict(state, expected)
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    return state


# -------------------------------------------------------------- headers (no tensor data read)
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
