"""Every public golden fixture, run by the same code `streamgen verify-fixture` runs."""
from __future__ import annotations

import pytest

from streamgen.parity import verify_fixture

from .conftest import FIXTURES

DIT_FIXTURES = ["dit", "self_forcing", "longlive", "longlive_lora", "reward_forcing", "rolling_forcing", "deep_forcing"]


@pytest.mark.parametrize("name", DIT_FIXTURES)
def test_fixture_matches_reference(name: str) -> None:
    report = verify_fixture(FIXTURES / name, atol=1e-4, rtol=1e-4)
    assert report.passed, report.render()


def test_every_variant_and_weight_file_is_checked() -> None:
    """The runner must not silently skip outputs: dit runs both weight files, reward forcing both alphas."""
    dit = {name.split("]")[0] for name, *_ in verify_fixture(FIXTURES / "dit").rows}
    assert dit == {"[checkpoint.pt", "[weights.safetensors"}
    rows = [name for name, *_ in verify_fixture(FIXTURES / "reward_forcing").rows]
    assert {"alpha0.999.final_latents", "alpha0.5.final_latents", "alpha0.999.step_x0", "alpha0.5.step_x0"} <= set(rows)


def test_tampered_expectation_fails(tmp_path) -> None:
    """A runner that passes on any output would be worthless: corrupt one golden tensor and expect FAIL."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(FIXTURES / "self_forcing", tmp_path / "self_forcing")
    shutil.copytree(FIXTURES / "dit", tmp_path / "dit")
    tensors = load_file(str(tmp_path / "self_forcing" / "tensors.safetensors"))
    tensors["final_latents"] = tensors["final_latents"] + 1e-3
    save_file(tensors, str(tmp_path / "self_forcing" / "tensors.safetensors"))
    report = verify_fixture(tmp_path / "self_forcing")
    assert not report.passed
    assert [name for name, _, ok in report.rows if not ok] == ["final_latents"]
    assert json.loads((tmp_path / "self_forcing" / "meta.json").read_text())["fixture"] == "self_forcing"
