"""TAEHV: the tiny autoencoder for Wan2.1 latents (``taew2_1``), with exact streaming decode.

A cheap stand-in for the Wan VAE when previewing or streaming: per-frame 2D convs on NTCHW
tensors, plus three temporal pieces: ``MemBlock`` (sees its own input from the previous time
step), ``TPool`` (merges ``s`` frames) and ``TGrow`` (splits one frame into ``s``). Every
temporal dependency is causal and one step deep, so decoding can run latent by latent with a
small explicit state (``TAEHVStreamDecoder``) and give the same frames as the parallel decode.
State-dict keys are the real ``encoder.<i>…`` / ``decoder.<i>…`` names, so ``taew2_1``
checkpoints load with a strict load after one TGrow patch (see ``load_taehv_state``).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, check_state_dict, read_tensors
from .config import TAEHVConfig

logger = logging.getLogger(__name__)

__all__ = [
    "TAEHVConfig",
    "MemBlock",
    "TPool",
    "TGrow",
    "SoftClamp",
    "TAEHV",
    "TAEHVStreamDecoder",
    "load_taehv_state",
]


# --- configuration -------------------------------------------------------------------------




# --- layers --------------------------------------------------------------------------------


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


def _per_frame(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame of an NTCHW tensor in one batch."""
    n, t = x.shape[:2]
    y = layer(x.reshape(n * t, *x.shape[2:]))
    return y.reshape(n, t, *y.shape[1:])


class SoftClamp(nn.Module):
    """``3·tanh(x/3)``: keeps out-of-range latents from blowing up the decoder (no weights)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that also sees its own input from the previous time step.

    ``ReLU(conv.4(ReLU(conv.2(ReLU(conv.0(cat[x_t, past_t]))))) + x_t)``; ``past`` is supplied by
    the caller (shifted input in parallel mode, carried state when streaming).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(2 * channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(), _conv(channels, channels)
        )
        self.act = nn.ReLU()

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        """x, past: NTCHW with the same shape; frame t of ``past`` is the block input at t-1."""
        return self.act(_per_frame(self.conv, torch.cat([x, past], dim=2)) + x)


class TPool(nn.Module):
    """Merge ``stride`` consecutive frames (earlier first along channels) with a 1×1 conv."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c, h, w = x.shape
        if t % self.stride:
            raise ValueError(f"TPool stride {self.stride} needs a multiple of {self.stride} frames, got {t}")
        return _per_frame(self.conv, x.reshape(n, t // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """Split each frame into ``stride`` frames: a 1×1 conv to ``stride·C``, frame ``t·s+j`` = slice ``j``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c, h, w = x.shape
        return _per_frame(self.conv, x).reshape(n, t * self.stride, c, h, w)


# --- running a layer stack with optional carried state --------------------------------------


@dataclass
class _CausalState:
    """What one stream carries between pushes: each MemBlock's last input, each TPool's unpaired frames."""

    memory: dict[int, Tensor] = field(default_factory=dict)
    pending: dict[int, Tensor] = field(default_factory=dict)


def _run_layers(
    layers: nn.Sequential, x: Tensor, state: _CausalState | None = None, taps: Iterable[int] = ()
) -> tuple[Tensor | None, dict[int, Tensor]]:
    """Run an NTCHW stack over all frames of ``x`` at once.

    Without ``state`` the sequence starts from zero memory and must be complete (parallel mode).
    With ``state`` it continues a stream: MemBlocks take their first ``past`` from the previous
    push and TPools hold back frames until they have a full group, so pushing a clip in pieces
    gives the same result as pushing it whole. Returns None when a TPool swallowed everything.
    """
    taps = set(taps)
    seen: dict[int, Tensor] = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            first = state.memory.get(i) if state is not None else None
            if first is None:
                first = torch.zeros_like(x[:, :1])
            past = torch.cat([first, x[:, :-1]], dim=1)
            if state is not None:
                state.memory[i] = x[:, -1:].detach()
            x = layer(x, past)
        elif isinstance(layer, TPool) and state is not None:
            held = state.pending.pop(i, None)
            if held is not None:
                x = torch.cat([held, x], dim=1)
            keep = x.shape[1] - x.shape[1] % layer.stride
            if keep < x.shape[1]:
                state.pending[i] = x[:, keep:].detach()
            if keep == 0:
                return None, seen
            x = layer(x[:, :keep])
        elif isinstance(layer, (TPool, TGrow)):
            x = layer(x)
        else:
            x = _per_frame(layer, x)
        if i in taps:
            seen[i] = x
    return x, seen


# --- the model -----------------------------------------------------------------------------


class TAEHV(nn.Module):
    """Tiny video autoencoder in the Wan2.1 latent space (NTCHW, pixels in [0, 1])."""

    def __init__(self, config: TAEHVConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TAEHVConfig()
        e = cfg.encoder_width
        enc: list[nn.Module] = [_conv(cfg.image_channels * cfg.patch_size**2, e), nn.ReLU()]
        for down in cfg.encoder_time_downscale:
            enc += [TPool(e, 2 if down else 1), _conv(e, e, stride=2, bias=False), MemBlock(e), MemBlock(e), MemBlock(e)]
        enc.append(_conv(e, cfg.latent_channels))
        self.encoder = nn.Sequential(*enc)

        w = cfg.decoder_widths
        dec: list[nn.Module] = [SoftClamp(), _conv(cfg.latent_channels, w[0]), nn.ReLU()]
        for i, (t_up, s_up) in enumerate(zip(cfg.decoder_time_upscale, cfg.decoder_space_upscale)):
            dec += [MemBlock(w[i]), MemBlock(w[i]), MemBlock(w[i]),
                    nn.Upsample(scale_factor=2 if s_up else 1, mode="nearest"),
                    TGrow(w[i], 2 if t_up else 1), _conv(w[i], w[i + 1], bias=False)]
        dec += [nn.ReLU(), _conv(w[3], cfg.image_channels * cfg.patch_size**2)]
        self.decoder = nn.Sequential(*dec)

    # checkpoint helpers

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in self.state_dict().items()}

    def tgrow_weight_keys(self) -> list[str]:
        """Keys of the TGrow convs, which the real-file patch may trim (see ``load_taehv_state``)."""
        return [f"{part}.{i}.conv.weight" for part in ("encoder", "decoder")
                for i, layer in enumerate(getattr(self, part)) if isinstance(layer, TGrow)]

    @classmethod
    def from_checkpoint(cls, source: str | Path | Mapping[str, Tensor], config: TAEHVConfig | None = None) -> "TAEHV":
        """Build, load (strict, float32) and switch to eval mode."""
        model = cls(config)
        model.load_state_dict(load_taehv_state(source, model), strict=True)
        return model.eval()

    # decoding

    def decode_raw(self, latents: Tensor, taps: Iterable[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """All ``t_upscale·T`` decoder frames before trim and clamp, plus the outputs of the
        ``decoder.<i>`` layers listed in ``taps`` (for localising bugs against a reference)."""
        raw, seen = _run_layers(self.decoder, latents, taps=taps)
        assert raw is not None
        return raw, seen

    def decode_video(self, latents: Tensor, parallel: bool = True) -> Tensor:
        """[B, T, C_lat, h, w] → [B, 4T−3, 3, 8h, 8w] in [0, 1].

        ``parallel=False`` pushes the latents one by one through a stream decoder (less memory).
        """
        if not parallel:
            stream = TAEHVStreamDecoder(self)
            return torch.cat([stream.push(latents[:, t:t + 1]) for t in range(latents.shape[1])], dim=1)
        raw, _ = self.decode_raw(latents)
        return raw[:, self.config.frames_to_trim:].clamp(0, 1)

    # encoding

    def pad_video(self, video: Tensor) -> Tensor:
        """Repeat the last frame at the end up to a multiple of ``t_downscale`` (one latent per group)."""
        extra = -video.shape[1] % self.config.t_downscale
        if extra:
            video = torch.cat([video, video[:, -1:].expand(-1, extra, *video.shape[2:])], dim=1)
        return video

    def encode_video(self, video: Tensor, parallel: bool = True) -> Tensor:
        """[B, T, 3, H, W] in [0, 1] → [B, ceil(T/4), C_lat, H/8, W/8] (no clamp, no normalisation)."""
        video = self.pad_video(video)
        if parallel:
            latents, _ = _run_layers(self.encoder, video)
            assert latents is not None
            return latents
        state = _CausalState()
        outs = [y for t in range(video.shape[1]) if (y := _run_layers(self.encoder, video[:, t:t + 1], state)[0]) is not None]
        return torch.cat(outs, dim=1)


# --- streaming decode ----------------------------------------------------------------------


class TAEHVStreamDecoder:
    """Decode one stream latent by latent, exactly as ``decode_video`` would decode it whole.

    Holds the stream's own state (each MemBlock's previous input, how many leading frames are
    still to drop); the model is shared and untouched, so several streams can run side by side.
    Each push returns every frame it completes: 1 for the first latent, then ``t_upscale`` each.
    """

    def __init__(self, model: TAEHV) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next push is treated as latent 0."""
        self._state = _CausalState()
        self._to_trim = self.model.config.frames_to_trim
        self.latents_seen = 0

    @torch.no_grad()
    def push(self, latents: Tensor) -> Tensor:
        """latents [B, n, C_lat, h, w] (n ≥ 1) → the frames they complete, [B, k, 3, 8h, 8w] in [0, 1]."""
        if latents.ndim != 5:
            raise ValueError(f"expected NTCHW latents [B, n, C, h, w], got shape {tuple(latents.shape)}")
        raw, _ = _run_layers(self.model.decoder, latents, self._state)
        assert raw is not None
        self.latents_seen += latents.shape[1]
        drop = min(self._to_trim, raw.shape[1])
        self._to_trim -= drop
        return raw[:, drop:].clamp(0, 1)


# --- loading -------------------------------------------------------------------------------


def load_taehv_state(
    source: str | Path | Mapping[str, Tensor], model: TAEHV, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Read a TAEHV state dict (safetensors / .pth, or an already-loaded dict) ready for a strict load.

    Applies the reference's one patch for real ``taew2_*`` files: a TGrow weight with more output
    channels than this model's ``stride·C`` keeps only the LAST ones (the files were trained with
    larger strides). Then every missing / unexpected / mis-shaped key is reported at once
    (``CheckpointError``), and tensors are cast to ``dtype`` (the files are often bf16 / fp16).
    """
    state = dict(source) if isinstance(source, Mapping) else read_tensors(source)
    non_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if non_tensors:
        raise CheckpointError(f"TAEHV checkpoint has non-tensor entries: {', '.join(non_tensors[:20])}")
    expected = model.expected_shapes()
    for key in model.tgrow_weight_keys():
        if key in state and state[key].ndim == 4 and state[key].shape[0] > expected[key][0]:
            logger.info("TAEHV load: %s %s -> keeping its last %d output channels",
                        key, tuple(state[key].shape), expected[key][0])
            state[key] = state[key][-expected[key][0]:]
    check_state_dict(state, expected)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
