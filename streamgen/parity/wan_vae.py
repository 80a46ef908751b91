"""Runner for the wan_vae fixture: one-shot decode, streaming decode by chunks, encode.

Every size comes from the fixture: model config from meta.json, latent/video shapes from the
tensors, and the streaming chunk boundaries from the frame counts of `decode_stream.chunk<i>`.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from ..models.wan_vae import WanVAE, load_wan_vae
from .common import Fixture, Report

_CHUNK = re.compile(r"^decode_stream\.chunk(\d+)$")


def stream_chunk_latents(fx: Fixture, temporal_factor: int) -> list[int]:
    """Latents per streaming chunk, read back from the golden chunks' frame counts (1 + f·(n−1) first, then f·n)."""
    chunks = sorted((int(m[1]), name) for name in fx.tensors if (m := _CHUNK.match(name)))
    counts: list[int] = []
    for _, name in chunks:
        frames = fx.tensors[name].shape[2]
        extra = temporal_factor - 1 if not counts else 0
        if (frames + extra) % temporal_factor:
            raise ValueError(f"{name} has {frames} frames: not a whole number of latents")
        counts.append((frames + extra) // temporal_factor)
    return counts


def decode_in_chunks(vae: WanVAE, z_norm: Tensor, sizes: list[int], mean: Tensor, std: Tensor) -> list[Tensor]:
    """Decode `z_norm` as one stream fed `sizes` latents per push."""
    stream = vae.stream_decoder(mean, std)
    out, start = [], 0
    for size in sizes:
        out.append(stream.push(z_norm[:, :, start : start + size]))
        start += size
    return out


def run(fx: Fixture, report: Report) -> None:
    t = fx.tensors
    mean, std = t["latent_mean"], t["latent_std"]
    vae = load_wan_vae(fx.path / "weights.safetensors", fx.config, latent_mean=mean, latent_std=std)
    z_norm = t["latent_norm"]
    latents = z_norm.shape[2]
    produced: dict[str, Tensor] = {}

    with torch.no_grad():
        full = vae.decode(z_norm)
        produced["decode_full"] = full

        sizes = stream_chunk_latents(fx, vae.temporal_factor)
        if sizes:
            if sum(sizes) != latents:
                raise ValueError(f"stream chunks cover {sum(sizes)} latents, latent_norm has {latents}")
            chunks = decode_in_chunks(vae, z_norm, sizes, mean, std)
            produced.update({f"decode_stream.chunk{i}": c for i, c in enumerate(chunks)})
            # Not golden tensors, but the fixture's claim: the stream equals the one-shot decode.
            report.compare("decode_stream.concat_vs_decode_full", torch.cat(chunks, dim=2), full)
            reversed_sizes = sizes[::-1]
            if reversed_sizes != sizes:
                alt = torch.cat(decode_in_chunks(vae, z_norm, reversed_sizes, mean, std), dim=2)
                report.compare(f"decode_stream.chunks{reversed_sizes}_vs_decode_full", alt, full)

        if "video" in t:
            produced["encode_mu_norm"] = vae.encode(t["video"])

    report.compare_all(produced, t)
