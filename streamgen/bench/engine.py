"""`streamgen bench engine`: per-chunk latency, frames/s, time per DiT call, KV bytes and flatness
(cost of chunks 1000–1010 over chunks 10–20) of one stream on a random-weight model."""
from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..bundles.bundle import dtype_name, prepare_dit, resolve_dtype
from ..bundles.real import ContextOnDevice
from ..engine.stream import Stream, StreamConfig
from ..engine.threads import default_threads
from ..models.attention import pick_backend
from ..models.config import DiTConfig
from ..models.decoders import FrameDecoder
from ..models.dit import WanDiT
from ..models.random_text import RandomTextEncoder

FLAT_EARLY = (10, 20)
FLAT_LATE = (1000, 1010)


@dataclass
class EngineBench:
    """What to run; defaults are a small CPU config and a bounded-memory window policy."""

    model: DiTConfig = field(default_factory=lambda: DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, text_len=16))
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(8, 8, policy="ema_sink",
                                                                      policy_settings={"capacity_frames": 9, "sink_frames": 3}))
    chunks: int = FLAT_LATE[1] + 1
    threads: int | None = None
    seed: int = 0
    decoder: Callable[[], FrameDecoder] | None = None  # decode every chunk too (time to first frame, decode cost)
    dtype: str = "auto"  # precision of the DiT (see models.bundle.prepare_dit); auto: bf16 on CUDA, fp32 on the CPU
    quant: str = "none"
    compile: str = "none"
    device: str = "cpu"  # cpu | cuda (the decoder factory must build on the same device)


def dit_flops(cfg: DiTConfig, tokens: int, keys: int, text_len: int) -> float:
    """Multiply-adds ×2 of one DiT call of `tokens` query tokens attending to `keys` self-attention keys:
    the block linears (q, k, v, o, cross q/o, FFN) plus self- and cross-attention scores and values."""
    d, f = cfg.dim, cfg.ffn_dim
    linear = tokens * (4 * d * d + 2 * d * d + 2 * d * f)
    attention = 2 * tokens * keys * d + 2 * tokens * text_len * d
    return 2.0 * cfg.num_layers * (linear + attention)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak of the device for MFU (H100/H200 SXM bf16/fp16: 989 TFLOP/s); None where unknown."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return 989e12 if ("H100" in name or "H200" in name) else None


def run(bench: EngineBench, progress: bool = True) -> dict[str, Any]:
    torch.set_num_threads(bench.threads or default_threads())
    torch.manual_seed(bench.seed)
    device = torch.device(bench.device)
    dtype = resolve_dtype(bench.dtype, device)
    model = prepare_dit(WanDiT(bench.model).to(device).eval(), dtype, bench.quant, bench.compile)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # timings of finished work only
    config = replace(bench.stream, dtype=dtype)
    text = ContextOnDevice(RandomTextEncoder(bench.model.text_len, bench.model.text_dim), device, torch.float32)
    stream = Stream(model, text, config, "a benchmark prompt")
    decoder = bench.decoder() if bench.decoder is not None else None
    decode_s: list[float] = []
    decoded = 0
    first_frame_s = None
    times: list[float] = []
    cpu: list[float] = []  # process CPU time per chunk: what the chunk cost, whatever else the machine runs
    calls: list[int] = []
    t0 = time.perf_counter()
    first_chunk_s = None
    for _ in tqdm(range(bench.chunks), desc="bench engine", unit="chunk", disable=not progress):
        before, start, start_cpu = stream.dit_calls, time.perf_counter(), time.process_time()
        chunk = stream.next_chunk()
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        calls.append(stream.dit_calls - before)
        first_chunk_s = first_chunk_s if first_chunk_s is not None else time.perf_counter() - t0
        if decoder is not None:
            start = time.perf_counter()
            with torch.no_grad():
                decoded += decoder.push(chunk.latents).shape[1]
            sync()
            decode_s.append(time.perf_counter() - start)
            first_frame_s = first_frame_s if first_frame_s is not None else time.perf_counter() - t0
    frames = chunk.latents.shape[1]
    steady = times[min(FLAT_EARLY[0], len(times) - 1):]
    mcfg = bench.model
    tokens = frames * (config.latent_height // mcfg.patch_size[1]) * (config.latent_width // mcfg.patch_size[2])
    keys = tokens + stream.policy.capacity_frames * tokens // frames  # the chunk plus a full window
    probe = torch.zeros(1, 1, mcfg.num_heads, mcfg.head_dim, device=device, dtype=dtype)
    result: dict[str, Any] = {
        "benchmark": "engine",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "attention_backend": pick_backend(probe, None),
        "model": bench.model.to_dict(),
        "precision": {"dtype": dtype_name(dtype), "quant": bench.quant, "compile": bench.compile},
        "dit_bytes": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
        "stream": {k: (str(v) if k in ("dtype", "transition") else v) for k, v in config.__dict__.items()},
        "chunks": bench.chunks,
        "first_chunk_s": first_chunk_s,
        "chunk_ms_p50": 1e3 * statistics.median(steady),
        "chunk_ms_p95": 1e3 * sorted(steady)[int(0.95 * (len(steady) - 1))],
        "latent_frames_per_s": frames / statistics.mean(steady),
        "video_frames_per_s_at_4x": 4 * frames / statistics.mean(steady),
        "dit_calls_per_chunk": statistics.mean(calls[FLAT_EARLY[0]:] or calls),
        "dit_call_ms": 1e3 * sum(steady) / max(1, sum(calls[min(FLAT_EARLY[0], len(calls) - 1):])),
        "kv_bytes": stream.kv_bytes,
        "dit_tflops_per_call": dit_flops(mcfg, tokens, keys, mcfg.text_len) / 1e12,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    peak = peak_flops(device, dtype)
    result["mfu"] = (1e12 * result["dit_tflops_per_call"] / (result["dit_call_ms"] / 1e3) / peak) if peak else None
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if decoder is not None:
        steady_decode = decode_s[min(FLAT_EARLY[0], len(decode_s) - 1):]
        result.update({
            "time_to_first_frame_s": first_frame_s,
            "decode_ms_p50": 1e3 * statistics.median(steady_decode),
            "video_frames_decoded": decoded,
            "video_frames_per_s_with_decode": decoded / (sum(times) + sum(decode_s)),
        })
    if bench.chunks > FLAT_LATE[1]:
        def ratio(series: list[float]) -> float:  # medians: one OS hiccup must not decide it
            early = statistics.median(series[FLAT_EARLY[0]:FLAT_EARLY[1] + 1])
            return statistics.median(series[FLAT_LATE[0]:FLAT_LATE[1] + 1]) / early

        result["flatness"] = ratio(cpu)
        result["flatness_wall"] = ratio(times)
        result["flatness_goal"] = "within 5% (0.95–1.05), on process CPU time"
    return result


def render(result: dict[str, Any]) -> str:
    keys = ["first_chunk_s", "chunk_ms_p50", "chunk_ms_p95", "latent_frames_per_s", "video_frames_per_s_at_4x",
            "attention_backend", "dit_calls_per_chunk", "dit_call_ms", "dit_tflops_per_call", "mfu", "peak_gpu_mb",
            "dit_bytes", "kv_bytes", "peak_rss_mb", "time_to_first_frame_s", "decode_ms_p50",
            "video_frames_per_s_with_decode", "flatness", "flatness_wall"]
    lines = [f"bench engine: policy={result['stream']['policy']} schedule={result['stream']['schedule']} "
             f"sampler={result['stream']['sampler']} threads={result['machine']['threads']} chunks={result['chunks']} "
             + " ".join(f"{k}={v}" for k, v in result["precision"].items())]
    lines += [f"  {k:<26} {result[k]:.4g}" if isinstance(result[k], float) else f"  {k:<26} {result[k]}" for k in keys if k in result]
    return "\n".join(lines)
