"""umt5/ fixture runner: Wan's umT5 encoder on given ids/mask, then the zero-padded DiT context.

Sizes come from meta.json's config; weights are the fixture's own weights.safetensors (real key names).
"""
from __future__ import annotations

import torch

from ..models.umt5 import UMT5Config, UMT5Encoder, context_from_hidden, load_umt5_weights
from .common import Fixture, Report


def run(fx: Fixture, report: Report) -> None:
    model = load_umt5_weights(fx.path / "weights.safetensors", UMT5Encoder(UMT5Config.from_dict(fx.config))).eval()
    ids, mask = fx.tensors["ids"], fx.tensors["mask"]
    with torch.no_grad():
        hidden = model(ids, mask)
    report.compare_all({"encoder_out_raw": hidden, "context": context_from_hidden(hidden, mask)}, fx.tensors)
