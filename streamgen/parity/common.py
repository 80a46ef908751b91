"""Shared parts of the fixture runners: reading a fixture folder, building the model it describes,
comparing named outputs against the golden tensors."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..models.checkpoint import load_dit_weights
from ..models.config import DiTConfig
from ..models.dit import WanDiT


@dataclass
class Fixture:
    """A folder with meta.json and tensors.safetensors (see the fixtures README)."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Tensor]

    @classmethod
    def open(cls, path: str | Path) -> "Fixture":
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{path} has no meta.json: not a fixture folder")
        return cls(path, json.loads((path / "meta.json").read_text()), load_file(str(path / "tensors.safetensors")))

    @property
    def kind(self) -> str:
        return self.meta.get("fixture", self.path.name)

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    @property
    def tokens_per_frame(self) -> int:
        return int(self.config["tokens_per_frame"])

    def frames(self, tokens_key: str) -> int:
        """A token count from the config, as latent frames."""
        return int(self.config[tokens_key]) // self.tokens_per_frame

    def weights_path(self) -> Path:
        """The fixture's own weights, else the shared tiny DiT of its fixture set (`../dit`)."""
        for candidate in (self.path / "weights.safetensors", self.path.parent / "dit" / "weights.safetensors"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no weights.safetensors in {self.path} or {self.path.parent / 'dit'}")

    def build_model(self, weights: str | Path | None = None, **load_kwargs: Any) -> WanDiT:
        model = WanDiT(DiTConfig.from_dict(self.config)).eval()
        state = load_dit_weights(weights or self.weights_path(), model.expected_shapes(), **load_kwargs)
        model.load_state_dict(state, strict=True)
        return model


@dataclass
class Report:
    """max |Δ| per named output against the fixture, with allclose(atol, rtol) as the verdict."""

    fixture: str
    atol: float
    rtol: float
    rows: list[tuple[str, float, bool]] = field(default_factory=list)

    def compare(self, name: str, actual: Tensor, expected: Tensor) -> None:
        actual = actual.detach().to(expected.dtype).cpu()
        if actual.shape != expected.shape:
            self.rows.append((f"{name} (shape {tuple(actual.shape)} vs {tuple(expected.shape)})", float("inf"), False))
            return
        diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
        ok = bool(torch.allclose(actual, expected, atol=self.atol, rtol=self.rtol)) if expected.is_floating_point() else torch.equal(actual, expected)
        self.rows.append((name, diff, ok))

    def compare_all(self, produced: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
        for name in sorted(produced):
            if name in expected:
                self.compare(name, produced[name], expected[name])

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(ok for _, _, ok in self.rows)

    def render(self) -> str:
        width = max((len(n) for n, _, _ in self.rows), default=10)
        lines = [f"fixture {self.fixture}: atol={self.atol:g} rtol={self.rtol:g}"]
        lines += [f"  {'ok ' if ok else 'BAD'} {name:<{width}}  max|Δ|={diff:.3e}" for name, diff, ok in self.rows]
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {sum(ok for *_, ok in self.rows)}/{len(self.rows)} outputs within tolerance")
        return "\n".join(lines)


def end_index(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)
