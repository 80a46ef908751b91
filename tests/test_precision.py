"""DiT precision options on the CPU: bf16 / fp16, int8 / fp8 weight-only quantization, torch.compile, and
the CUDA-graphs refusal without a GPU.

Tolerances are relative L2 errors ‖out − ref‖ / ‖ref‖ against fp32 on the tiny fixture DiT (measured
here: bf16 0.7%, fp16 0.09%, int8 0.8%, fp8 3.4%, bf16 + int8 1.1%, the same for one DiT call and for
a 4-chunk stream); each bound is about 3× the measurement.
"""
from __future__ import annotations

import copy
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from streamgen.bundles import bundle as bundle_module
from streamgen.bundles.bundle import BundleSpec, load_bundle, prepare_dit
from streamgen.cli import main
from streamgen.engine.stream import Stream, StreamConfig
from streamgen.models.attention import BlockCausalAttention
from streamgen.models.quant import BLOCK_LINEARS, QuantLinear

WINDOW = {"policy": "window_sink", "policy_settings": {"capacity_frames": 12, "sink_frames": 3}}
PROMPT = "a red fox running"
TOLERANCE = {("bf16", "none"): 3e-2, ("fp16", "none"): 3e-3, ("fp32", "int8"): 3e-2, ("fp32", "fp8"): 1e-1,
             ("bf16", "int8"): 4e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def stream_latents(dit, text_encoder, dtype: torch.dtype, chunks: int = 4) -> torch.Tensor:
    s = Stream(dit, text_encoder, StreamConfig(8, 8, seed=3, dtype=dtype, **WINDOW), PROMPT)
    return torch.cat([s.next_chunk().latents for _ in range(chunks)], dim=1)


def dit_call(dit, text_encoder, dtype: torch.dtype) -> torch.Tensor:
    """One full-sequence DiT call (6 frames, block-causal) on fixed noise at t = 500."""
    x = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        return dit(x, torch.full((1, 6), 500.0), dit.cross_kv(text_encoder.encode(PROMPT)), BlockCausalAttention(dit.rope, 3))


def state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.fixture(scope="module")
def reference(tiny_model, text_encoder, one_thread) -> dict[str, torch.Tensor]:
    return {"stream": stream_latents(tiny_model, text_encoder, torch.float32),
            "call": dit_call(tiny_model, text_encoder, torch.float32)}


@pytest.mark.parametrize("dtype,quant", list(TOLERANCE))
def test_precision_close_to_fp32(tiny_model, text_encoder, reference, dtype: str, quant: str) -> None:
    torch_dtype = DTYPES[dtype]
    dit = prepare_dit(copy.deepcopy(tiny_model), torch_dtype, quant)
    call = dit_call(dit, text_encoder, torch_dtype)
    latents = stream_latents(dit, text_encoder, torch_dtype)
    assert call.dtype == latents.dtype == torch_dtype
    tol = TOLERANCE[dtype, quant]
    assert relative_error(call, reference["call"]) <= tol
    assert relative_error(latents, reference["stream"]) <= tol
    assert relative_error(latents, reference["stream"]) > 1e-5  # the option changed something
    # the numerically sensitive parts stay fp32 (spec §a.5: time embedding, modulation, affine LayerNorm)
    block = dit.blocks[0]
    assert dit.time_embedding[0].weight.dtype == dit.time_projection[1].weight.dtype == torch.float32
    assert block.modulation.dtype == dit.head.modulation.dtype == block.norm3.weight.dtype == torch.float32
    assert dit.patch_embedding.weight.dtype == block.self_attn.norm_q.weight.dtype == torch_dtype


@pytest.mark.parametrize("quant,storage", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_quantized_linears_are_smaller(tiny_model, quant: str, storage: torch.dtype) -> None:
    """Each block's 10 attention / FFN linears are swapped; embeddings and head are not. A quantized
    linear stores 1 byte per weight plus a 4-byte scale per output channel (fp32: 4 bytes per weight)."""
    dit = prepare_dit(copy.deepcopy(tiny_model), torch.float32, quant)
    for block, ref in zip(dit.blocks, tiny_model.blocks):
        for path in BLOCK_LINEARS:
            q, linear = block.get_submodule(path), ref.get_submodule(path)
            assert isinstance(q, QuantLinear) and q.weight.dtype == storage and q.scale.shape == (q.out_features, 1)
            assert state_bytes(q) == q.weight.numel() + 4 * q.out_features + 4 * q.out_features  # weight, scale, bias
            assert state_bytes(q) < state_bytes(linear) / 3
            assert (q.dequantized(torch.float32) - linear.weight).abs().max() <= linear.weight.abs().max() / 16
    assert isinstance(dit.text_embedding[0], torch.nn.Linear) and isinstance(dit.head.head, torch.nn.Linear)
    quantized = [m for m in dit.modules() if isinstance(m, QuantLinear)]
    saved = sum(3 * m.weight.numel() - 4 * m.out_features for m in quantized)  # 4 → 1 byte per weight, + scales
    assert len(quantized) == 10 * len(dit.blocks) and state_bytes(tiny_model) - state_bytes(dit) == saved
    # quantized keys: the real names, plus a `scale` beside every quantized weight
    scales = {f"blocks.{i}.{path}.scale" for i in range(len(dit.blocks)) for path in BLOCK_LINEARS}
    assert set(dit.state_dict()) == set(tiny_model.state_dict()) | scales


def test_real_family_loads_by_key_names_then_quantizes(tmp_path: Path) -> None:
    """A family checkpoint (FSDP-wrapped keys, LoRA) loads into plain Linears by its real names and is
    quantized after: the dequantized weights equal the merged checkpoint within int8 rounding."""
    from safetensors.torch import load_file

    from .test_registry import FIXTURES, tiny_family, tiny_model_dir

    yaml_path, d = tiny_family(tmp_path / "configs"), tiny_model_dir(tmp_path, with_tokenizer=True)
    bundle = load_bundle(str(yaml_path), str(d), quant="int8")
    assert bundle.spec == BundleSpec(str(yaml_path), str(d), dtype="fp32", quant="int8")
    merged = load_file(FIXTURES / "longlive_lora" / "merged_weights.safetensors")
    state = bundle.dit.state_dict()
    for key, value in merged.items():
        module, _, leaf = key.rpartition(".")
        got = bundle.dit.get_submodule(module)
        if isinstance(got, QuantLinear) and leaf == "weight":
            step = value.abs().amax(dim=1, keepdim=True) / 127  # one int8 step per output channel
            assert ((got.dequantized(torch.float32) - value).abs() <= step / 2 + 1e-6).all(), key
        else:
            assert (state[key] - value).abs().max() < 1e-6, key
    latents = Stream(bundle.dit, bundle.text_encoder, bundle.stream, "a red fox in the snow").next_chunk().latents
    assert latents.shape == (1, 3, 16, 8, 8) and torch.isfinite(latents).all()


def _inductor_unavailable() -> str | None:
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} in torch {torch.__version__}"
    if not any(shutil.which(cxx) for cxx in ("g++", "clang++", "c++")):
        return "inductor's CPU backend compiles C++: no g++, clang++ or c++ on PATH"
    return None


INDUCTOR_MISSING = _inductor_unavailable()


@pytest.mark.skipif(INDUCTOR_MISSING is not None, reason=str(INDUCTOR_MISSING))
def test_compile_matches_eager(tiny_model, text_encoder, reference) -> None:
    """torch.compile (inductor) on the CPU: the cache policies run eagerly between compiled parts, so
    the stream is the eager one within 1e-5 (measured 7e-7), with no recompile per layer or chunk."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dit = prepare_dit(copy.deepcopy(tiny_model), torch.float32, compile="inductor")
    latents = stream_latents(dit, text_encoder, torch.float32)
    assert (latents - reference["stream"]).abs().max() <= 1e-5
    # prologue, a block around its self-attention (2), cross-attention + FFN + head, ...: 5 here, not 2 per layer
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: CUDA graphs are allowed")
def test_cuda_graphs_without_a_gpu_is_refused_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bundle_module, "BUNDLES", {"tiny-random": lambda: pytest.fail("built a model first")})
    with pytest.raises(ValueError, match="--cuda-graphs .* needs a CUDA GPU"):
        load_bundle("tiny-random", compile="cuda-graphs")
    out = tmp_path / "x.mp4"
    assert main(["render", "--model", "tiny-random", "--prompt", "a fox", "--seconds", "1", "--cuda-graphs",
                 "-o", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not out.exists()
    assert main(["bench", "engine", "--chunks", "1", "--cuda-graphs", "--quiet", "--out", str(tmp_path / "b.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


def test_bundle_spec_records_what_was_loaded() -> None:
    """`load_bundle` resolves dtype auto (fp32 on the CPU) into the bundle's spec: what Ray actors load."""
    from streamgen.backends.ray.wire import build_bundle, bundle_name

    bundle = load_bundle("tiny-random", dtype="bf16", quant="int8")
    assert bundle.spec == BundleSpec("tiny-random", dtype="bf16", quant="int8")
    assert bundle.stream.dtype == torch.bfloat16
    assert load_bundle("tiny-random").spec == BundleSpec("tiny-random", dtype="fp32")
    spec = pickle.loads(pickle.dumps(bundle.spec))
    again = build_bundle(spec)
    assert bundle_name(spec) == "tiny-random" and again.spec == bundle.spec
    assert all(torch.equal(a, b) for a, b in zip(again.dit.state_dict().values(), bundle.dit.state_dict().values()))
    assert build_bundle("tiny-random").spec == BundleSpec("tiny-random", dtype="fp32")
    for bad, match in (({"dtype": "fp64"}, "unknown dtype 'fp64'"), ({"quant": "int4"}, "unknown quantization"),
                       ({"compile": "max"}, "unknown compile mode")):
        with pytest.raises(ValueError, match=match):
            BundleSpec("tiny-random", **bad)


def test_bench_engine_reports_precision(tmp_path: Path, capsys) -> None:
    results = {}
    for name, extra in (("fp32", []), ("bf16-int8", ["--dtype", "bf16", "--quant", "int8"])):
        out = tmp_path / f"{name}.json"
        assert main(["bench", "engine", "--chunks", "2", "--threads", "1", "--quiet", "--out", str(out), *extra]) == 0
        results[name] = json.loads(out.read_text())
    assert "dtype=bf16 quant=int8 compile=none" in capsys.readouterr().out
    assert results["fp32"]["precision"] == {"dtype": "fp32", "quant": "none", "compile": "none"}
    assert results["bf16-int8"]["precision"] == {"dtype": "bf16", "quant": "int8", "compile": "none"}
    assert results["bf16-int8"]["stream"]["dtype"] == "torch.bfloat16"
    assert results["bf16-int8"]["dit_bytes"] < 0.5 * results["fp32"]["dit_bytes"]
    assert results["bf16-int8"]["kv_bytes"] == results["fp32"]["kv_bytes"] // 2


def test_serve_loads_the_model_with_the_requested_precision() -> None:
    """`streamgen serve --quant int8 --dtype bf16` reaches load_bundle: the served DiT is quantized, in bf16."""
    import asyncio

    import aiohttp

    from streamgen.serve.config import ServeConfig
    from streamgen.serve.server import Server

    async def run() -> None:
        server = Server(ServeConfig(port=0, model="tiny-random", max_sessions=1,
                                    precision={"dtype": "bf16", "quant": "int8"}))
        await server.start()
        try:
            dit = server.backend.bundle.dit
            assert any(isinstance(m, QuantLinear) for m in dit.modules())
            assert dit.patch_embedding.weight.dtype == torch.bfloat16
            async with aiohttp.ClientSession() as http, http.get(f"{server.url}/health") as resp:
                assert resp.status == 200
        finally:
            await server.stop()

    asyncio.run(run())
