"""Ray actors load a real model family from a model dir, with the driver's dtype and quantization.

`streamgen render --backend ray --model FAMILY --model-dir DIR --quant int8`: the driver loads (and
checks) the family, the stage and decoder actors load it again from the bundle's `BundleSpec` (name,
model dir, dtype, quant, compile). The family here is the tiny LongLive-like YAML of test_registry with
a model dir built from the golden fixtures (FSDP-wrapped DiT keys, LoRA, umT5, Wan VAE).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from streamgen.backends.ray import cluster  # noqa: E402
from streamgen.bundles.bundle import BundleSpec  # noqa: E402
from streamgen.cli import main  # noqa: E402
from streamgen.render.writer import load_latents  # noqa: E402

from .test_registry import tiny_family, tiny_model_dir  # noqa: E402

TIMELINE = """\
- at: 0
  prompt: a red fox in the snow
- at: 0.4
  prompt: the fox jumps
"""


def test_render_ray_loads_the_family_from_its_model_dir_with_int8(ray_cluster, tmp_path: Path, monkeypatch) -> None:
    yaml_path, model_dir = tiny_family(tmp_path / "configs"), tiny_model_dir(tmp_path, with_tokenizer=True)
    (tmp_path / "story.yaml").write_text(TIMELINE)
    recipes = []

    def spy(bundle, backend="local", **kwargs):
        made = make_backend(bundle, backend, **kwargs)
        recipes.extend(p.cfg.model for p in getattr(made, "pipelines", []))
        return made

    make_backend = cluster.make_backend
    monkeypatch.setattr(cluster, "make_backend", spy)

    def render(backend: str, *extra: str) -> tuple[torch.Tensor, dict]:
        out = tmp_path / f"{backend}{len(extra)}.safetensors"
        argv = ["render", "--model", str(yaml_path), "--model-dir", str(model_dir),
                "--timeline", str(tmp_path / "story.yaml"), "--seconds", "1.5", "--seed", "3",
                "--schedule", "timestep-slot", "--unbatched", "--threads", "1", "--quiet", "--latents-out", str(out),
                "--backend", backend, *extra]
        assert main(argv) == 0
        return load_latents(str(out))

    ray_latents, ray_meta = render("ray", "--quant", "int8", "--ray-address", ray.get_runtime_context().gcs_address,
                                   "--stages", "2", "--ray-cpus", "0.5")
    local_latents, local_meta = render("local", "--quant", "int8")
    assert recipes == [BundleSpec(str(yaml_path), str(model_dir), dtype="fp32", quant="int8")]
    assert (ray_meta["backend"], local_meta["backend"]) == ("ray", "local")
    assert ray_meta["model"] == local_meta["model"] == "tiny-longlive"
    assert ray_latents.shape == local_latents.shape == (1, 7, 16, 8, 8)  # the latents of the 24 video frames written: 1 + 4·6 ≥ 24
    # one thread on both sides, slots one by one: the actors ran the same quantized weights
    assert torch.equal(ray_latents, local_latents)
    unquantized, _ = render("local")
    assert (unquantized - local_latents).abs().max() > 1e-4  # so the actors did quantize
