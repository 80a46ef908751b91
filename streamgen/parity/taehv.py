"""Runner for the taehv fixture: parallel, streaming and sequential decode, decoder intermediates, encode."""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.taehv import TAEHV, TAEHVConfig, TAEHVStreamDecoder
from .common import Fixture, Report

_TAP_PREFIX = "decode.after_decoder."


def run(fx: Fixture, report: Report) -> None:
    t = fx.tensors
    model = TAEHV.from_checkpoint(fx.path / "weights.safetensors", TAEHVConfig.from_meta(fx.meta))
    latents, video = t["latents"], t["video"]
    taps = sorted(int(name.removeprefix(_TAP_PREFIX)) for name in t if name.startswith(_TAP_PREFIX))
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        raw, seen = model.decode_raw(latents, taps)
        out["decode.raw"] = raw
        out.update({f"{_TAP_PREFIX}{i}": x for i, x in seen.items()})
        out["decode_parallel"] = model.decode_video(latents, parallel=True)

        stream = TAEHVStreamDecoder(model)
        pieces = [stream.push(latents[:, i:i + 1]) for i in range(latents.shape[1])]
        out["decode_stream"] = torch.cat(pieces, dim=1)
        out["decode_stream_frames_per_latent"] = torch.tensor([p.shape[1] for p in pieces], dtype=torch.int64)

        out["encode"] = model.encode_video(video, parallel=True)
        report.compare("decode_video(parallel=False) vs decode_parallel",
                       model.decode_video(latents, parallel=False), t["decode_parallel"])
        report.compare("encode_video(parallel=False) vs encode", model.encode_video(video, parallel=False), t["encode"])
    report.compare_all(out, t)
