"""Model registry: family YAMLs, `streamgen models list|show|check`, `load_family`, benchmark set-up.

Everything here is CPU and small: real-size models only ever exist on the meta device; model dirs are
built in tmp_path for a tiny family YAML (dim 128, 2 layers) from the real-layout golden fixtures
(`dit/checkpoint.pt` with its FSDP-wrapped envelopes, LongLive's `lora.pt`, the reduced umT5 / VAE).
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from streamgen.bench.setup import (
    add_bench_model_options,
    bench_engine_setup,
    bench_setup_from_args,
)
from streamgen.bundles import check, family
from streamgen.bundles.check import (
    ModelDirError,
    check_model_dir,
    expected_dit_shapes,
    expected_umt5_shapes,
    expected_vae_shapes,
)
from streamgen.bundles.family import (
    FamilyConfigError,
    build_policy,
    family_files,
    load_family_config,
    load_family_file,
)
from streamgen.bundles.models_cli import add_models_parser
from streamgen.models.checkpoint import read_lazy

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("self-forcing", "causvid", "longlive", "rolling-forcing", "reward-forcing", "deep-forcing",
            "deep-forcing-pc", "wan2.1-t2v-1.3b")

try:
    import streamgen.cache.compression  # noqa: F401
    HAVE_PC = True
except ImportError:
    HAVE_PC = False


# ------------------------------------------------------------------------------------ real sizes
def test_full_size_dit_on_meta_has_825_keys_and_1_419b_params() -> None:
    spec = load_family_config("wan2.1-t2v-1.3b")
    shapes = expected_dit_shapes(spec.dit_config())
    assert len(shapes) == 825
    assert sum(math.prod(s) for s in shapes.values()) == 1_418_996_800
    assert shapes["blocks.29.ffn.0.weight"] == (8960, 1536)
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert spec.latent_size() == (60, 104) and spec.latent_size("832x480") == (60, 104)


def test_real_text_encoder_and_vae_shapes_on_meta() -> None:
    spec = load_family_config("self-forcing")
    umt5 = expected_umt5_shapes(spec.files.text_encoder.config)
    assert sum(math.prod(s) for s in umt5.values()) == 5_680_910_336
    vae = expected_vae_shapes(spec.files.vae.config)
    assert len(vae) == 194 and abs(sum(math.prod(s) for s in vae.values()) - 126.9e6) < 0.1e6


# ------------------------------------------------------------------------------------ every YAML
def test_registry_holds_every_family() -> None:
    assert set(FAMILIES) <= set(family_files())


@pytest.mark.parametrize("name", FAMILIES)
def test_every_yaml_validates_and_its_policy_builds(name: str) -> None:
    path = family_files()[name]
    raw = yaml.safe_load(path.read_text())
    if raw["stream"]["policy"] == "deep_sink_pc" and not HAVE_PC:
        pytest.skip("streamgen/cache/compression.py not importable yet")
    spec = load_family_file(path)
    assert spec.name == name and spec.path == path
    policy = build_policy(spec.stream.policy, spec.stream.policy_settings)
    assert policy.name == spec.stream.policy
    assert policy.settings()["capacity_frames"] == spec.stream.policy_settings["capacity_frames"]
    cfg = spec.stream_config()
    assert (cfg.latent_height, cfg.latent_width, cfg.sampler) == (60, 104, spec.stream.sampler)
    assert spec.dit_config() == load_family_config("wan2.1-t2v-1.3b").dit_config()  # all Wan2.1-T2V-1.3B
    assert spec.video.fps == 16
    assert spec.files.text_encoder.path == ("models_t5_umt5-xxl-enc-bf16.pth",)
    assert spec.files.tokenizer.path == ("google/umt5-xxl",)
    assert spec.files.vae.path == ("Wan2.1_VAE.pth",)
    assert spec.files.taehv is not None and spec.files.taehv.optional and "taew2_1.pth" in spec.files.taehv.path


# spec §b.7: (policy, key settings, sampler, steps, warp, shift, envelope)
B7 = {
    "self-forcing": ("full", {"capacity_frames": 21}, "few_step", [1000, 750, 500, 250], True, 5.0, "generator_ema"),
    "causvid": ("full", {"capacity_frames": 21}, "few_step", [1000, 757, 522], False, 8.0, "generator"),
    "longlive": ("window_sink", {"capacity_frames": 12, "sink_frames": 3}, "few_step", [1000, 750, 500, 250], True, 5.0,
                 "generator"),
    "rolling-forcing": ("rolling_anchor", {"capacity_frames": 24, "attention_frames": 21}, "rolling",
                        [1000, 800, 600, 400, 200], True, 5.0, "generator_ema"),
    "reward-forcing": ("ema_sink", {"capacity_frames": 9, "sink_frames": 3, "alpha": 0.999}, "few_step",
                       [1000, 750, 500, 250], True, 5.0, "flat"),
    "deep-forcing": ("deep_sink", {"capacity_frames": 21, "sink_frames": 14}, "few_step", [1000, 750, 500, 250], True,
                     5.0, "generator_ema"),
    "deep-forcing-pc": ("deep_sink_pc", {"capacity_frames": 21, "sink_frames": 10, "budget_frames": 16,
                                         "recent_frames": 4}, "few_step", [1000, 750, 500, 250], True, 5.0, "generator_ema"),
}


@pytest.mark.parametrize("name", sorted(B7))
def test_family_settings_match_spec_b7(name: str) -> None:
    if name == "deep-forcing-pc" and not HAVE_PC:
        pytest.skip("streamgen/cache/compression.py not importable yet")
    policy, settings, sampler, steps, warp, shift, envelope = B7[name]
    s = load_family_config(name)
    assert s.stream.policy == policy and sampler == s.stream.sampler
    assert settings.items() <= s.stream.policy_settings.items()
    assert list(s.stream.steps) == steps and s.stream.warp_steps is warp and s.stream.shift == shift
    assert s.files.dit.envelope[0] == envelope and s.stream.chunk_frames == 3 and s.stream.context_noise == 0
    assert (s.files.lora is not None) == (name == "longlive")


def test_fed_timesteps_and_lora_settings() -> None:
    assert load_family_config("self-forcing").fed_timesteps() == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert load_family_config("rolling-forcing").fed_timesteps() == pytest.approx(
        [1000.0, 952.381, 882.3529, 769.2308, 555.5556], abs=1e-3)
    assert load_family_config("causvid").fed_timesteps() == [1000.0, 757.0, 522.0]
    lora = load_family_config("longlive").files.lora
    assert (lora.rank, lora.alpha, lora.key, len(lora.target_modules)) == (256, 256, "generator_lora", 10)
    assert load_family_config("deep-forcing").files.dit.path == load_family_config("self-forcing").files.dit.path


# --------------------------------------------------------------------------------- invalid YAMLs
def _real_yaml(name: str) -> dict:
    return yaml.safe_load(family_files()[name].read_text())


def _write_yaml(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["stream"]["policy_settings"].update(capacity_frames="twelve"), "stream"),
    (lambda d: d["stream"].update(policy="window_sinc"), "stream"),
    (lambda d: d["stream"].update(steps=[250, 500]), "stream.steps"),
    (lambda d: d["architecture"].pop("num_layers"), "architecture.num_layers"),
    (lambda d: d["architecture"].update(num_heads=7), "architecture"),
    (lambda d: d["files"]["lora"].pop("rank"), "files.lora.rank"),
    (lambda d: d["files"]["dit"].update(envelope="ema"), "files.dit.envelope"),
    (lambda d: d["files"]["dit"].update(path="/abs/x.pt"), "files.dit.path"),
    (lambda d: d.update(windw=12), "windw"),
    (lambda d: d["video"].update(latent_height=61), "video"),
])
def test_invalid_yaml_error_names_file_and_field(tmp_path: Path, mutate, field: str) -> None:
    data = _real_yaml("longlive")
    mutate(data)
    path = _write_yaml(tmp_path, data)
    with pytest.raises(FamilyConfigError) as err:
        load_family_file(path)
    msg = str(err.value)
    assert str(path) in msg and f"  {field}" in msg, msg


def test_unknown_policy_lists_known_and_name_must_match_file(tmp_path: Path) -> None:
    data = _real_yaml("longlive")
    data["stream"]["policy"] = "window_sinc"
    with pytest.raises(FamilyConfigError, match="known: .*window_sink"):
        load_family_file(_write_yaml(tmp_path, data))
    data = _real_yaml("longlive")
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FamilyConfigError, match="name: 'longlive' must equal the file name 'other'"):
        load_family_file(path)
    with pytest.raises(FamilyConfigError, match="unknown model family 'nope'; known: .*longlive"):
        load_family_config("nope")


def test_configs_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _real_yaml("reward-forcing")
    data["name"] = "my-family"
    _write_yaml(tmp_path / "models", data)
    monkeypatch.setenv(family.CONFIG_ENV, str(tmp_path))
    assert list(family_files()) == ["my-family"]
    assert load_family_config("my-family").stream.policy == "ema_sink"
    monkeypatch.setenv(family.CONFIG_ENV, str(tmp_path / "missing"))
    with pytest.raises(FamilyConfigError, match=family.CONFIG_ENV):
        family_files()


# ---------------------------------------------------------------------- tiny family + model dir
TINY_ARCH = dict(dim=128, ffn_dim=256, freq_dim=256, text_dim=32, text_len=16, num_heads=2, num_layers=2, in_dim=16,
                 out_dim=16, patch_size=[1, 2, 2], eps=1e-6, qk_norm=True, cross_attn_norm=True)
TINY_UMT5 = dict(vocab_size=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, encoder_layers=2, num_buckets=32,
                 shared_pos=False, relative_max_dist=128, eps=1e-6)
TINY_VAE = dict(dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temporal_downsample=[False, True, True])
TINY_TAEHV = dict(encoder_width=8, decoder_widths=[16, 8, 8, 8])


def tiny_family(folder: Path, name: str = "tiny-longlive", lora_rank: int = 4, envelope: str = "generator_ema") -> Path:
    """A LongLive-like family at the golden fixtures' tiny dims (64x64 video -> 8x8 latents)."""
    data = _real_yaml("longlive")
    data.update(name=name, architecture=TINY_ARCH)
    data["video"] = dict(width=64, height=64, latent_height=8, latent_width=8, vae_stride=[4, 8, 8], fps=16)
    data["files"]["dit"]["envelope"] = envelope
    data["files"]["lora"].update(rank=lora_rank, alpha=lora_rank)
    data["files"]["text_encoder"]["config"] = TINY_UMT5
    data["files"]["vae"]["config"] = TINY_VAE
    data["files"]["taehv"]["config"] = TINY_TAEHV
    return _write_yaml(folder, data)


def _zeros(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}


def _write_tokenizer(folder: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "in", "snow", "the", "jumps"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))


def tiny_model_dir(root: Path, with_tokenizer: bool = False) -> Path:
    """Files at the real relative paths: the FSDP-wrapped DiT fixture, LongLive's LoRA fixture, the
    reduced umT5 / VAE fixtures and a zero TAEHV (header checks only read shapes)."""
    d = root / "model"
    (d / "models").mkdir(parents=True)
    shutil.copy(FIXTURES / "dit" / "checkpoint.pt", d / "models" / "longlive_base.pt")
    shutil.copy(FIXTURES / "longlive_lora" / "lora.pt", d / "models" / "lora.pt")
    torch.save(load_file(FIXTURES / "umt5" / "weights.safetensors"), d / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(load_file(FIXTURES / "wan_vae" / "weights.safetensors"), d / "Wan2.1_VAE.pth")
    from streamgen.models.taehv import TAEHV

    with torch.device("meta"):
        shapes = TAEHV(check.taehv_config(TINY_TAEHV)).expected_shapes()
    torch.save(_zeros(shapes), d / "taew2_1.pth")
    if with_tokenizer:
        _write_tokenizer(d / "google" / "umt5-xxl")
    else:
        (d / "google" / "umt5-xxl").mkdir(parents=True)
        (d / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    return tiny_family(tmp_path / "configs"), tiny_model_dir(tmp_path)


def test_read_lazy_gives_meta_tensors(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, d = tiny
    obj = read_lazy(d / "models" / "longlive_base.pt")
    assert set(obj) == {"generator", "generator_ema"}
    assert all(v.is_meta for v in obj["generator_ema"].values())
    save_file({"w": torch.zeros(3, 5, dtype=torch.bfloat16)}, tmp_path / "x.safetensors")
    lazy = read_lazy(tmp_path / "x.safetensors")
    assert lazy["w"].is_meta and lazy["w"].shape == (3, 5) and lazy["w"].dtype == torch.bfloat16


def test_correct_tiny_dir_passes(tiny: tuple[Path, Path]) -> None:
    yaml_path, d = tiny
    report = check_model_dir(yaml_path, d)
    assert report.ok, report.render()
    assert {f.role: f.status for f in report.files} == {
        "dit": "ok", "lora": "ok", "text_encoder": "ok", "tokenizer": "ok", "vae": "ok", "taehv": "ok"}
    assert "[generator_ema] 69 tensors" in report.render()
    assert check_model_dir(yaml_path, d, decoder="taehv").ok


def test_misshaped_tensor_is_named(tiny: tuple[Path, Path]) -> None:
    yaml_path, d = tiny
    spec = load_family_file(yaml_path)
    shapes = expected_dit_shapes(spec.dit_config())
    shapes["blocks.1.self_attn.q.weight"] = (128, 127)
    (d / "models" / "longlive_base.pt").unlink()
    save_file(_zeros(shapes), d / "models" / "longlive_base.safetensors")
    spec_data = yaml.safe_load(yaml_path.read_text())
    spec_data["files"]["dit"]["path"] = ["models/longlive_base.safetensors"]
    yaml_path.write_text(yaml.safe_dump(spec_data))
    report = check_model_dir(yaml_path, d)
    assert not report.ok
    assert ("models/longlive_base.safetensors: blocks.1.self_attn.q.weight: got (128, 127), expected (128, 128)"
            in report.problems)
    assert len(report.problems) == 1, report.problems


def test_missing_lora_is_named(tiny: tuple[Path, Path]) -> None:
    yaml_path, d = tiny
    (d / "models" / "lora.pt").unlink()
    report = check_model_dir(yaml_path, d)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("LongLive needs models/lora.pt (its LoRA adapter, rank 4, alpha 4)")
    assert "Efficient-Large-Model/LongLive-1.3B" in report.problems[0]


def test_wrong_envelope_lora_rank_and_missing_keys(tmp_path: Path) -> None:
    d = tiny_model_dir(tmp_path)
    # LongLive's release uses `generator`; a Rolling-Forcing-style file with only generator_ema is refused.
    obj = torch.load(d / "models" / "longlive_base.pt", weights_only=True)
    torch.save({"generator_ema": obj["generator_ema"], "critic": obj["generator"]}, d / "models" / "longlive_base.pt")
    report = check_model_dir(tiny_family(tmp_path / "c1", envelope="generator"), d)
    assert any("expected envelope 'generator'" in p and "generator_ema" in p for p in report.problems), report.problems
    report = check_model_dir(tiny_family(tmp_path / "c2", lora_rank=8), d)
    assert any("base_model.model.blocks.0.self_attn.q.lora_A.weight: got (4, 128), expected (8, 128) (rank 8)" in p
               for p in report.problems), report.problems
    vae = load_file(FIXTURES / "wan_vae" / "weights.safetensors")
    vae.pop("conv2.weight")
    torch.save(vae, d / "Wan2.1_VAE.pth")
    report = check_model_dir(tiny_family(tmp_path / "c3"), d)
    assert report.problems == ["Wan2.1_VAE.pth: 1 missing key: conv2.weight"]
    # the TAEHV file is optional unless it is the chosen decoder
    (d / "taew2_1.pth").unlink()
    assert check_model_dir(tiny_family(tmp_path / "c4"), d, decoder="taehv").problems[-1].startswith(
        "LongLive needs taew2_1.pth (the TAEHV decoder)")


# ------------------------------------------------------------------------------------- the CLI
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamgen")
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_models_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["models", "list"]) == (0 if HAVE_PC else 1)
    out = capsys.readouterr().out
    for name, (policy, *_rest) in B7.items():
        if name == "deep-forcing-pc" and not HAVE_PC:
            continue
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert policy + "(" in line, line
    assert "window_sink(capacity_frames=12, sink_frames=3" in out and "wan2.1-t2v-1.3b" in out
    assert _cli(["models", "show", "longlive"]) == 0
    out = capsys.readouterr().out
    assert "window_sink(capacity_frames=12, sink_frames=3, global_sink=True)" in out
    assert "825 keys, 1,418,996,800 params" in out and "1560 tokens per latent frame" in out
    assert "rank 256, alpha 256" in out and "fed timesteps [1000.0, 937.5, 833.3333, 625.0]" in out
    assert "12 frames = 3.21 GiB" in out


def test_models_check_exit_codes(tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path, d = tiny
    assert _cli(["models", "check", str(d), "--family", str(yaml_path)]) == 0
    assert "ok: every required file" in capsys.readouterr().out
    (d / "models" / "lora.pt").unlink()
    assert _cli(["models", "check", str(d), "--family", str(yaml_path)]) == 1
    assert "LongLive needs models/lora.pt" in capsys.readouterr().out
    # without --family: every registered family is tried; none has its DiT checkpoint here
    assert _cli(["models", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "self-forcing: not here (no checkpoints/self_forcing_dmd.pt" in out
    assert "usable families" in out


# ----------------------------------------------------------------------------------- load_family
def test_load_family_checks_before_loading(tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from streamgen.bundles import real

    yaml_path, d = tiny
    (d / "models" / "lora.pt").unlink()
    monkeypatch.setattr(real, "load_dit", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(ModelDirError, match="LongLive needs models/lora.pt"):
        real.load_family(yaml_path, d)


def test_load_family_from_tiny_dir_merges_lora_and_streams(tmp_path: Path) -> None:
    from streamgen.bundles.real import load_family
    from streamgen.engine.stream import Stream

    yaml_path, d = tiny_family(tmp_path / "configs"), tiny_model_dir(tmp_path, with_tokenizer=True)
    bundle = load_family(yaml_path, d)
    merged = load_file(FIXTURES / "longlive_lora" / "merged_weights.safetensors")
    state = bundle.dit.state_dict()
    assert set(state) == set(merged)
    assert max((state[k] - merged[k]).abs().max().item() for k in merged) < 1e-6
    assert bundle.stream.policy == "window_sink" and (bundle.stream.latent_height, bundle.stream.latent_width) == (8, 8)
    assert bundle.stream.dtype == torch.float32 and bundle.fps == 16
    ctx = bundle.text_encoder.encode("a red fox")
    assert ctx.shape == (1, 16, 32) and ctx[0, 4:].abs().sum() == 0 and ctx[0, :4].abs().sum() > 0  # 3 words + EOS
    stream = Stream(bundle.dit, bundle.text_encoder, bundle.stream, "a red fox in the snow")
    latents = stream.next_chunk().latents
    assert latents.shape == (1, 3, 16, 8, 8) and torch.isfinite(latents).all()
    frames = bundle.decoder().push(latents)
    assert frames.shape == (1, 9, 64, 64, 3) and frames.dtype == torch.uint8


def test_random_weights_bundle_reads_no_files(tmp_path: Path) -> None:
    from streamgen.bundles.real import load_family
    from streamgen.engine.stream import Stream
    from streamgen.models.taehv import TAEHV

    bundle = load_family(tiny_family(tmp_path), random_weights=True, decoder="taehv", size="32x48")
    assert bundle.dit.cfg.dim == 128 and (bundle.stream.latent_height, bundle.stream.latent_width) == (6, 4)
    assert isinstance(bundle.decoder().stream.model, TAEHV)
    stream = Stream(bundle.dit, bundle.text_encoder, bundle.stream, "a red fox")
    latents = stream.next_chunk().latents
    assert bundle.decoder().push(latents).shape == (1, 9, 48, 32, 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        load_family(tiny_family(tmp_path), random_weights=True, size="40x48")


def test_a_reduced_real_architecture_streams_with_random_weights() -> None:
    from streamgen.bundles.family import load_family_config, reduced_architecture
    from streamgen.bundles.real import load_family
    from streamgen.engine.stream import Stream
    from streamgen.models.random_text import RandomTextEncoder

    spec = load_family_config("wan2.1-t2v-1.3b")
    reduced = reduced_architecture(spec, layers=1, dim=128)
    bundle = load_family(spec, random_weights=True, size="832x480", decoder="preview", architecture=reduced)
    cfg = bundle.dit.cfg
    assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.head_dim, cfg.text_dim, cfg.text_len) == (1, 128, 1, 128, 4096, 512)
    assert isinstance(bundle.text_encoder.inner, RandomTextEncoder)
    assert bundle.text_encoder.encode("a fox").shape == (1, 512, 4096)
    assert (bundle.stream.latent_height, bundle.stream.latent_width, bundle.stream.policy) == (60, 104, "full")
    latents = Stream(bundle.dit, bundle.text_encoder, bundle.stream, "a fox").next_chunk().latents
    assert latents.shape == (1, 3, 16, 60, 104)
    with pytest.raises(ValueError, match="random_weights"):
        load_family(spec, "/nonexistent", architecture=reduced)


def test_decoder_is_chosen_by_one_flag_on_serve_render_and_bench(tmp_path: Path) -> None:
    """`--decoder vae|taehv|preview` means the same on every command and reaches `load_bundle`, which loads
    that decoder from the family's files (TAEHV, the real-time one, included)."""
    from streamgen.bundles.bundle import BundleSpec, load_bundle
    from streamgen.bundles.options import bundle_settings
    from streamgen.cli import build_parser
    from streamgen.models.decoders import LatentPreviewDecoder, TAEHVFrames, WanVAEFrames

    parser = build_parser()
    for argv in (["serve", "--decoder", "taehv"], ["render", "--prompt", "x", "--decoder", "taehv"]):
        assert bundle_settings(parser.parse_args(argv)) == {"decoder": "taehv"}
    assert "decoder" not in bundle_settings(parser.parse_args(["serve"]))  # the model's own
    assert parser.parse_args(["bench", "engine", "--decoder", "none"]).decoder == "none"  # bench only: no decode
    with pytest.raises(SystemExit):
        parser.parse_args(["render", "--prompt", "x", "--decoder", "none"])

    yaml_path, d = tiny_family(tmp_path / "configs"), tiny_model_dir(tmp_path, with_tokenizer=True)
    kinds = {kind: type(load_bundle(str(yaml_path), str(d), decoder=kind).decoder())
             for kind in (None, "vae", "taehv", "preview")}
    assert kinds == {None: WanVAEFrames, "vae": WanVAEFrames, "taehv": TAEHVFrames, "preview": LatentPreviewDecoder}
    assert load_bundle(str(yaml_path), str(d), decoder="taehv").spec.decoder == "taehv"  # Ray actors load the same
    with pytest.raises(ValueError, match="unknown decoder 'jpeg'"):
        BundleSpec("embedded", decoder="jpeg")
    with pytest.raises(ValueError, match="'embedded' is built in and decodes with its own decoder"):
        load_bundle("embedded", decoder="taehv")


# ------------------------------------------------------------------------------- bench engine args
def _bench_parser() -> argparse.ArgumentParser:
    """The `bench engine` options of cli.py (sizes default None) plus `add_bench_model_options`."""
    p = argparse.ArgumentParser()
    p.add_argument("--policy")
    p.add_argument("--policy-setting", type=lambda s: (s.split("=")[0], yaml.safe_load(s.split("=")[1])),
                   action="append", default=[])
    p.add_argument("--sampler")
    p.add_argument("--schedule")
    p.add_argument("--unbatched", action="store_true")
    p.add_argument("--steps", type=float, nargs="+")
    p.add_argument("--chunks", type=int, default=1011)
    for name in ("--dim", "--ffn-dim", "--heads", "--layers"):
        p.add_argument(name, type=int)
    p.add_argument("--seed", type=int, default=0)
    add_bench_model_options(p)
    return p


def test_bench_engine_setup_from_args() -> None:
    p = _bench_parser()
    assert bench_setup_from_args(p.parse_args([])) is None
    args = p.parse_args("--model wan2.1-t2v-1.3b --size 832x480 --layers 2 --chunks 7".split())
    model, stream = bench_setup_from_args(args)
    assert (model.num_layers, model.dim, model.text_dim, model.text_len) == (2, 1536, 4096, 512)
    assert (stream.latent_height, stream.latent_width, stream.policy, stream.steps) == (60, 104, "full",
                                                                                      (1000, 750, 500, 250))
    with pytest.raises(ValueError, match="--chunks 7, or a bounded policy"):
        bench_setup_from_args(p.parse_args("--model wan2.1-t2v-1.3b".split()))
    with pytest.raises(SystemExit):  # bench engine always builds random weights: no flag says so
        p.parse_args("--model wan2.1-t2v-1.3b --random-weights".split())
    args = p.parse_args("--model wan2.1-t2v-1.3b --policy window_sink --policy-setting "
                        "capacity_frames=21 --policy-setting sink_frames=3 --dim 256".split())
    model, stream = bench_setup_from_args(args)
    assert (model.dim, model.num_heads, model.num_layers) == (256, 2, 30)
    assert stream.policy_settings == {"capacity_frames": 21, "sink_frames": 3}
    _, stream = bench_engine_setup("longlive", policy_settings={"sink_frames": 6}, chunks=1011)
    assert stream.policy_settings == {"capacity_frames": 12, "sink_frames": 6, "global_sink": True}
    _, stream = bench_engine_setup("rolling-forcing", chunks=1011)
    assert (stream.sampler, len(stream.steps)) == ("rolling", 5)


def test_registry_import_is_light() -> None:
    """The CLI builds its parser from these modules: importing them must not import torch."""
    import subprocess
    import sys

    code = ("import sys, streamgen.bundles.family, streamgen.bundles.models_cli, streamgen.bundles.options, "
            "streamgen.bench.setup; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
