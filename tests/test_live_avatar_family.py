"""The live-avatar family (issue 11 item 4): its YAML, the real 14B DiT and LoRA targets on the meta device,
`models check` of a sharded S2V model dir (headers only) and the LoRA merge at alpha / r through the one
checkpoint loader.

The model dirs are synthetic and tiny: the live_avatar fixture's S2V config and weights (real key names),
written as 2 safetensors shards + index + config.json, a PEFT LoRA with LiveAvatar's key form
(``base_model.model.<module>.lora_A.default.weight``), the reduced umT5 / VAE fixtures, a header-only wav2vec2.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streamgen.bundles.check import check_model_dir, expected_dit_shapes
from streamgen.bundles.family import (
    FamilyConfigError,
    family_files,
    load_family_config,
    load_family_file,
    lora_targets,
    meta_dit,
    s2v_cond_tokens,
)
from streamgen.cli import main
from streamgen.models.checkpoint import CheckpointError, load_dit_weights, lora_problems, merge_lora, read_tensors
from streamgen.models.s2v import S2VConfig, S2VDiT

from .conftest import FIXTURES
from .test_live_avatar import real_keys
from .test_registry import TINY_UMT5, TINY_VAE

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = FIXTURES / "live_avatar"
META = json.loads((FIXTURE / "meta.json").read_text())["config"]
INDEX = "diffusion_pytorch_model.safetensors.index.json"
RANK, ALPHA = 4, 2.0  # the tiny adapter: scale 0.5 as the release's 64 / 128


def _raw_yaml() -> dict:
    return yaml.safe_load(family_files()["live-avatar"].read_text())


# ------------------------------------------------------------------------------------ the YAML
def test_yaml_validates_with_the_spec_settings() -> None:
    spec = load_family_config("live-avatar")
    assert spec.kind == "family" and spec.architecture.variant == "s2v"
    assert spec.dit_config() == S2VConfig()  # the real Wan2.2-S2V-14B configuration, as models/s2v defaults it
    s = spec.stream
    assert (s.policy, s.sampler, s.warp_steps, s.shift, s.chunk_frames) == ("s2v_rings", "few_step", False, 3.0, 3)
    assert spec.fed_timesteps() == META["timesteps"]  # fed as they are: already shifted
    assert s.policy_settings["rd_range"] == META["rd_range"] and s.policy_settings["capacity_frames"] == 12
    assert spec.video.fps == 25 and spec.latent_size() == (88, 48)
    assert s2v_cond_tokens(88, 48, spec.architecture.s2v.zip_frame_buckets) == 2640 <= s.policy_settings["cond_tokens"]
    lora = spec.files.lora
    assert (lora.rank, lora.alpha, lora.scale, lora.match, lora.adapter_name, lora.key) == (128, 64.0, 0.5, "suffix",
                                                                                            "default", None)
    assert spec.files.dit.sharded and spec.files.dit.path == (INDEX,) and spec.files.dit.envelope == ("flat",)
    assert [role for role, _, _ in spec.file_specs()] == ["dit", "lora", "text_encoder", "tokenizer", "vae",
                                                          "audio_encoder"]


def test_listing_stays_torch_free() -> None:
    code = ("import sys; from streamgen.bundles.family import load_all; specs, errors = load_all(build_checks=False); "
            "assert not errors, errors; assert 'live-avatar' in [s.name for s in specs]; "
            "assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["architecture"].pop("s2v"), "variant s2v needs an s2v block"),
    (lambda d: d["architecture"]["s2v"].update(audio_inject_layers=[0, 40]), "outside the 40 blocks"),
    (lambda d: d["stream"].update(policy="full", policy_settings={"capacity_frames": 21}), "own caches"),
    (lambda d: d["stream"]["policy_settings"].update(cond_tokens=2000), "cannot hold the 2640 cond tokens"),
    (lambda d: d["stream"]["policy_settings"].pop("rd_range"), "rd_range"),
    (lambda d: d["files"].pop("audio_encoder"), "needs files.audio_encoder"),
    (lambda d: d["files"]["lora"].update(target_modules=["nope"]), "name no Linear module of the DiT"),
    (lambda d: d["files"]["dit"].update(envelope="generator"), "envelope must be flat"),
])
def test_invalid_live_avatar_yaml_is_refused(tmp_path: Path, mutate, message: str) -> None:
    data = _raw_yaml()
    mutate(data)
    path = tmp_path / "live-avatar.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(FamilyConfigError, match=message):
        load_family_file(path)


def test_s2v_cache_on_a_t2v_architecture_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(family_files()["self-forcing"].read_text())
    data["stream"].update(policy="s2v_rings", policy_settings={"capacity_frames": 12, "cond_tokens": 10, "rd_range": [4, 30]})
    path = tmp_path / "self-forcing.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FamilyConfigError, match="cache of architecture.variant s2v, not t2v"):
        load_family_file(path, build_checks=False)


# ------------------------------------------------------------------ the real 14B model on meta
def test_real_14b_family_shapes_are_the_real_keys() -> None:
    """The family path (`expected_dit_shapes` of the YAML's config) gives the 1,260 keys of keys_14b.txt."""
    shapes = expected_dit_shapes(load_family_config("live-avatar").dit_config())
    assert len(shapes) == 1260 and sum(math.prod(s) for s in shapes.values()) == 16_295_755_609
    assert shapes == real_keys()


def _lora_for(targets: dict[str, tuple[int, int]], rank: int, device: str = "meta", prefix: str = "base_model.model.",
              seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, (out_f, in_f) in sorted(targets.items()):
        if device == "meta":
            a, b = torch.empty(rank, in_f, device="meta"), torch.empty(out_f, rank, device="meta")
        else:
            a, b = torch.randn(rank, in_f, generator=gen) / 4, torch.randn(out_f, rank, generator=gen) / 4
        out[f"{prefix}{module}.lora_A.default.weight"] = a
        out[f"{prefix}{module}.lora_B.default.weight"] = b
    return out


def test_real_lora_merge_touches_exactly_the_896_target_tensors() -> None:
    spec = load_family_config("live-avatar")
    cfg, lora = spec.dit_config(), spec.files.lora
    targets = lora_targets(cfg, lora.target_modules, match=lora.match)
    assert len(targets) == 448
    assert {m for m in targets if m.startswith("audio_injector.")} == {
        f"audio_injector.injector.{i}.{p}" for i in range(12) for p in "qkvo"}
    assert "casual_audio_encoder.encoder.final_linear" not in targets  # spec §1.1: not matched
    state = meta_dit(cfg).state_dict()
    adapter = _lora_for(targets, lora.rank)
    assert len(adapter) == 896 and sum(t.numel() for t in adapter.values()) == 676_331_520
    merged = merge_lora(state, adapter, rule=lora.rule(targets))
    touched = {k for k in state if merged[k] is not state[k]}
    assert touched == {f"{m}.weight" for m in targets}
    assert all(merged[k].shape == state[k].shape and merged[k].dtype == state[k].dtype for k in touched)
    # PEFT-saved keys (no adapter name) would silently not load in the reference: all 896 are named
    bare = {k.replace(".default.", "."): v for k, v in adapter.items()}
    _, problems = lora_problems(bare, lora.rule(targets), targets)
    assert sum("would not load" in p for p in problems) == 896
    assert problems[-1].startswith("no adapter for 448 of 448 target modules")


# ---------------------------------------------------------------------- a tiny sharded model dir
def tiny_arch() -> dict:
    """The fixture's tiny S2V config in the YAML's architecture schema."""
    model = META["model"]
    base = {k: model[k] for k in ("dim", "ffn_dim", "freq_dim", "text_dim", "text_len", "num_heads", "num_layers",
                                  "in_dim", "out_dim", "patch_size", "eps", "qk_norm", "cross_attn_norm")}
    s2v = dict(cond_dim=model["cond_dim"], audio_dim=model["audio_dim"], audio_layers=META["n_wav2vec_layers"],
               num_audio_token=model["num_audio_token"], audio_inject_layers=model["audio_inject_layers"],
               audio_norm_eps=1e-5, motion_frames=META["audio_pad_frames"], zip_frame_buckets=[1, 2, 16],
               ref_rope_frame=META["ref_rope_frame"])
    return {"variant": "s2v", **base, "rope_theta": float(META["rope_theta"]),
            "rope_max_frames": META["rope_table_rows"], "s2v": s2v}


def tiny_family(folder: Path, rank: int = RANK, alpha: float = ALPHA) -> Path:
    data = _raw_yaml()
    data.update(name="tiny-live-avatar", architecture=tiny_arch())
    h, w = META["latent_H"], META["latent_W"]
    data["video"] = dict(width=8 * w, height=8 * h, latent_height=h, latent_width=w, vae_stride=[4, 8, 8], fps=25)
    data["stream"]["policy_settings"]["cond_tokens"] = META["cond_cache_capacity_tokens"]
    data["files"]["lora"].update(rank=rank, alpha=alpha)
    data["files"]["text_encoder"]["config"] = TINY_UMT5
    data["files"]["vae"]["config"] = TINY_VAE
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-live-avatar.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_shards(d: Path, state: dict[str, torch.Tensor], index_override: dict[str, str] | None = None) -> None:
    keys = sorted(state)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k].contiguous() for k in part}, d / name)
        weight_map.update({k: name for k in part})
    weight_map.update(index_override or {})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def tiny_lora_targets(spec_path: Path) -> dict[str, tuple[int, int]]:
    spec = load_family_file(spec_path)
    return lora_targets(spec.dit_config(), spec.files.lora.target_modules, match=spec.files.lora.match)


def tiny_model_dir(root: Path, spec_path: Path) -> Path:
    d = root / "model"
    d.mkdir(parents=True)
    write_shards(d, load_file(FIXTURE / "weights.safetensors"))
    (d / "config.json").write_text(json.dumps({"_class_name": "CausalWanModel_S2V", **META["model"]}))
    save_file(_lora_for(tiny_lora_targets(spec_path), RANK, device="cpu"), d / "liveavatar.safetensors")
    torch.save(load_file(FIXTURES / "umt5" / "weights.safetensors"), d / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(load_file(FIXTURES / "wan_vae" / "weights.safetensors"), d / "Wan2.1_VAE.pth")
    (d / "google" / "umt5-xxl").mkdir(parents=True)
    (d / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    w2v = d / "wav2vec2-large-xlsr-53-english"
    w2v.mkdir()
    width, layers = META["model"]["audio_dim"], META["n_wav2vec_layers"] - 1
    (w2v / "config.json").write_text(json.dumps({"model_type": "wav2vec2", "hidden_size": width,
                                                 "num_hidden_layers": layers}))
    (w2v / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000}))
    save_file({f"wav2vec2.encoder.layers.{i}.attention.q_proj.weight": torch.zeros(width, width) for i in range(layers)},
              w2v / "model.safetensors")
    return d


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    spec_path = tiny_family(tmp_path / "configs")
    return spec_path, tiny_model_dir(tmp_path, spec_path)


def test_tiny_sharded_dir_passes_models_check(tiny: tuple[Path, Path], capsys) -> None:
    spec_path, d = tiny
    report = check_model_dir(spec_path, d)
    assert report.ok, report.render()
    assert {f.role: f.status for f in report.files} == {
        "dit": "ok", "lora": "ok", "text_encoder": "ok", "tokenizer": "ok", "vae": "ok", "audio_encoder": "ok"}
    text = report.render()
    assert "[flat] 168 tensors in 2 shards, float32, 621,961 params" in text
    assert "rank 4, alpha 2 (scale 0.5), 96 tensors for 48 of 48 target modules" in text
    assert main(["models", "check", str(d), "--family", str(spec_path)]) == 0
    assert "ok: every required file is present" in capsys.readouterr().out


def _rewrite_lora(d: Path, change, metadata: dict[str, str] | None = None) -> None:
    path = d / "liveavatar.safetensors"
    lora = load_file(path)
    change(lora)
    save_file(lora, path, metadata=metadata)


def _drop_key(d: Path, key: str) -> None:
    state = {}
    for shard in sorted(d.glob("diffusion_pytorch_model-*.safetensors")):
        state.update(load_file(shard))
    state.pop(key)
    write_shards(d, state)


def _reshape_key(d: Path, key: str, shape: tuple[int, ...]) -> None:
    state = {}
    for shard in sorted(d.glob("diffusion_pytorch_model-*.safetensors")):
        state.update(load_file(shard))
    state[key] = torch.zeros(shape)
    write_shards(d, state)


ORPHAN = "base_model.model.blocks.7.self_attn.q.lora_A.default.weight"
TAMPERED = {
    "missing key": (lambda d: _drop_key(d, "audio_injector.injector.1.q.bias"),
                    "1 missing key: audio_injector.injector.1.q.bias"),
    "wrong shape": (lambda d: _reshape_key(d, "casual_audio_encoder.weights", (1, 24, 1, 1)),
                    "casual_audio_encoder.weights: got (1, 24, 1, 1), expected (1, 25, 1, 1)"),
    "index points at the wrong shard": (
        lambda d: write_shards(d, load_file(FIXTURE / "weights.safetensors"),
                               {"audio_injector.injector.0.q.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}),
        "audio_injector.injector.0.q.weight: in shard diffusion_pytorch_model-00001-of-00002.safetensors, but the index "
        "places it in diffusion_pytorch_model-00002-of-00002.safetensors"),
    "orphan LoRA key": (lambda d: _rewrite_lora(d, lambda lora: lora.update({ORPHAN: torch.zeros(RANK, 64)})),
                        f"{ORPHAN}: blocks.7.self_attn.q is not a LoRA target of this model (it would not load)"),
    "LoRA key without the adapter name": (
        lambda d: _rewrite_lora(d, lambda lora: lora.update(
            {"base_model.model.blocks.0.ffn.0.lora_A.weight": lora.pop("base_model.model.blocks.0.ffn.0.lora_A.default.weight")})),
        "base_model.model.blocks.0.ffn.0.lora_A.weight: not [base_model.model.]<module>.lora_{A|B}.default.weight "
        "(it would not load)"),
    "LoRA key without the prefix": (
        lambda d: _rewrite_lora(d, lambda lora: lora.update(
            {"blocks.3.ffn.2.lora_B.default.weight": lora.pop("base_model.model.blocks.3.ffn.2.lora_B.default.weight")})),
        "blocks.3.ffn.2.lora_B.default.weight: lacks the base_model.model. prefix"),
    "LoRA target without adapter": (
        lambda d: _rewrite_lora(d, lambda lora: [lora.pop(f"base_model.model.audio_injector.injector.1.o.lora_{p}.default.weight")
                                                 for p in "AB"]),
        "no adapter for 1 of 48 target modules: audio_injector.injector.1.o"),
    "LoRA alpha in the file disagrees": (lambda d: _rewrite_lora(d, lambda lora: None, {"lora_alpha": "4.0", "r": "4"}),
                                         "LoRA hyper-parameters disagree: alpha 2 configured, the file declares 4"),
    "config.json injects elsewhere": (
        lambda d: (d / "config.json").write_text(json.dumps({**META["model"], "audio_inject_layers": [0, 3]})),
        "config.json: audio_inject_layers [0, 3], the family's architecture has (0, 2)"),
    "wav2vec2 with another depth": (
        lambda d: (d / "wav2vec2-large-xlsr-53-english" / "config.json").write_text(
            json.dumps({"hidden_size": 32, "num_hidden_layers": 12})),
        "num_hidden_layers 12 gives 13 hidden states, the S2V audio encoder weighs 25"),
}


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_tampered_dir_is_refused_naming_the_key(tiny: tuple[Path, Path], name: str) -> None:
    spec_path, d = tiny
    tamper, message = TAMPERED[name]
    tamper(d)
    report = check_model_dir(spec_path, d)
    assert not report.ok
    assert any(message in p for p in report.problems), report.problems


def test_wrong_lora_rank_is_refused_naming_the_key(tiny: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, d = tiny
    spec_path = tiny_family(tmp_path / "rank8", rank=8, alpha=4.0)
    report = check_model_dir(spec_path, d)
    assert report.problems[0] == ("liveavatar.safetensors: adapter rank is not the configured rank 8: rank 4 in 48 of "
                                  "48 adapter modules"), report.problems
    assert ("liveavatar.safetensors: base_model.model.audio_injector.injector.0.k.lora_A.default.weight: got (4, 64), "
            "expected (8, 64) (rank 8)") in report.problems
    assert main(["models", "check", str(d), "--family", str(spec_path)]) == 1
    assert "(rank 8)" in capsys.readouterr().out


def test_check_reads_headers_only(tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`models check` never reads tensor data: safetensors' data loaders are not called."""
    spec_path, d = tiny
    import safetensors.torch

    def refuse(*_a, **_k):
        raise AssertionError("models check read tensor data")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    assert check_model_dir(spec_path, d).ok


# ------------------------------------------------------------------------ merge through the loader
def test_merged_weights_equal_w_plus_scaled_ba(tiny: tuple[Path, Path]) -> None:
    spec_path, d = tiny
    spec = load_family_file(spec_path)
    targets = tiny_lora_targets(spec_path)
    base = load_file(FIXTURE / "weights.safetensors")
    assert read_tensors(d / INDEX).keys() == base.keys()  # the shards hold exactly the fixture's tensors
    model_cfg = spec.dit_config()
    with torch.device("meta"):
        expected = S2VDiT(model_cfg).expected_shapes()
    state = load_dit_weights(d / INDEX, expected, lora_path=d / "liveavatar.safetensors",
                             lora_rule=spec.files.lora.rule(targets), lora_key=None)
    lora = load_file(d / "liveavatar.safetensors")
    scale = spec.files.lora.alpha / spec.files.lora.rank
    assert scale == 0.5
    for module in ("blocks.1.ffn.0", "audio_injector.injector.1.o"):
        a = lora[f"base_model.model.{module}.lora_A.default.weight"].double()
        b = lora[f"base_model.model.{module}.lora_B.default.weight"].double()
        want = (base[f"{module}.weight"].double() + scale * b @ a).float()
        torch.testing.assert_close(state[f"{module}.weight"], want, atol=1e-6, rtol=1e-6)
        assert (state[f"{module}.weight"] - base[f"{module}.weight"]).abs().max() > 1e-3
    changed = {k for k in base if not torch.equal(state[k], base[k])}
    assert changed == {f"{m}.weight" for m in targets} and len(changed) == 48
    model = S2VDiT(model_cfg)
    model.load_state_dict(state, strict=True)


def test_alpha_from_the_file_or_the_config(tiny: tuple[Path, Path]) -> None:
    """The file's declared alpha fills a rule without one; a disagreement with the YAML is refused."""
    spec_path, d = tiny
    spec = load_family_file(spec_path)
    targets = tiny_lora_targets(spec_path)
    expected = expected_dit_shapes(spec.dit_config())
    rule = spec.files.lora.rule(targets)
    kwargs = dict(lora_path=d / "liveavatar.safetensors", lora_key=None)
    from_yaml = load_dit_weights(d / INDEX, expected, lora_rule=rule, **kwargs)
    _rewrite_lora(d, lambda lora: None, {"lora_alpha": "2.0", "r": "4"})
    from dataclasses import replace

    from_file = load_dit_weights(d / INDEX, expected, lora_rule=replace(rule, alpha=None, rank=None), **kwargs)
    assert all(torch.equal(from_yaml[k], from_file[k]) for k in from_yaml)
    with safe_open(str(d / "liveavatar.safetensors"), "pt") as f:
        assert f.metadata() == {"lora_alpha": "2.0", "r": "4"}
    with pytest.raises(CheckpointError, match="alpha 1 configured, the file declares 2"):
        load_dit_weights(d / INDEX, expected, lora_rule=replace(rule, alpha=1.0), **kwargs)
    _rewrite_lora(d, lambda lora: lora.pop("base_model.model.blocks.2.cross_attn.k.lora_B.default.weight"))
    with pytest.raises(CheckpointError, match="blocks.2.cross_attn.k: incomplete pair, lora_B missing"):
        load_dit_weights(d / INDEX, expected, lora_rule=rule, **kwargs)


def test_streaming_the_s2v_family_is_refused_with_the_reason() -> None:
    from streamgen.bench.setup import bench_engine_setup
    from streamgen.bundles.real import load_family

    with pytest.raises(ValueError, match="audio-driven .s2v. family.*cannot be loaded to stream yet"):
        load_family("live-avatar", random_weights=True)
    with pytest.raises(ValueError, match="cannot be benchmarked yet"):
        bench_engine_setup("live-avatar", layers=2)


def test_models_show_names_the_lora_rule(capsys) -> None:
    from streamgen.cli import main

    assert main(["models", "show", "live-avatar"]) == 0
    out = capsys.readouterr().out
    assert "[bare adapter, rank 128, alpha 64 (scale 0.5), 6 module names by PEFT's suffix rule (448 modules)]" in out
    assert "1260 keys, 16,295,755,609 params" in out
