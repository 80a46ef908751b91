"""The Wan2.1 causal 3D-conv VAE (spec §e.1) with exact streaming decode.

Key names equal the released ``Wan2.1_VAE.pth`` (``encoder.*``, ``conv1.*``, ``conv2.*``,
``decoder.*``), so the real file loads with ``load_state_dict(strict=True)``.

Every temporal conv is causal (padded on the past side only). The encoder and decoder always
run frame-group by frame-group — the encoder sees the first frame alone and then groups of 4,
the decoder sees one latent frame at a time — and each causal conv carries the last
``CACHE_T`` input frames of the previous call in a ``CausalCache``. Because a one-shot decode
is the same sequence of per-latent calls, a stream that keeps its cache between chunks gives
bit-identical frames however the latents are chunked. The cache is an explicit per-stream
object (never module state), so any number of streams can share one model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, check_state_dict, read_tensors

CACHE_T = 2  # past input frames each k=3 causal conv needs from the previous call

# Wan2.1 latent channel statistics (spec §e.1): z_norm = (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


class CausalCache:
    """Causal state of one encoder or decoder stream: per conv, its trailing input frames.

    Keyed by the conv module itself, so the state belongs to the stream, not the model.
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, Tensor] = {}

    def get(self, conv: nn.Module) -> Tensor | None:
        return self._frames.get(conv)

    def set(self, conv: nn.Module, frames: Tensor) -> None:
        self._frames[conv] = frames

    def clear(self) -> None:
        self._frames.clear()

    def __len__(self) -> int:
        return len(self._frames)


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    t, h, w = value
    return (int(t), int(h), int(w))


class CausalConv3d(nn.Conv3d):
    """3D conv padded only on the past side in time, so output frame t sees inputs ≤ t."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = _triple(padding)
        self._pad = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: W, H, T (past side only)

    def forward(self, x: Tensor, past: Tensor | None = None) -> Tensor:
        """`past` (frames from an earlier call) replaces that many of the leading zero frames."""
        pad = list(self._pad)
        if past is not None and pad[4] > 0:
            x = torch.cat([past, x], dim=2)
            pad[4] -= past.shape[2]
        return super().forward(F.pad(x, pad))

    def step(self, x: Tensor, cache: CausalCache) -> Tensor:
        """Streaming call: use the cached past frames, then keep the last CACHE_T inputs."""
        past = cache.get(self)
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T and past is not None:
            keep = torch.cat([past[:, :, -1:], keep], dim=2)
        out = self(x, past)
        cache.set(self, keep.clone())  # own copy: do not pin the whole activation
        return out


class RMSNorm(nn.Module):
    """Wan's "RMS_norm": L2-normalise over channels, times √C and a per-channel gamma."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-exact ×2 spatial upsampling, done in fp32 like the reference."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


def _per_frame(fn: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2D module to every frame of [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class ResidualBlock(nn.Module):
    """norm → SiLU → conv → norm → SiLU → dropout → conv, plus a 1×1×1 shortcut if C changes."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer.step(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing, no state)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.squeeze(1).permute(0, 2, 1).reshape(n, c, h, w))

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        return _per_frame(self._attend, x) + x


class Resample(nn.Module):
    """Spatial ×2 up/down-sampling, optionally with a causal temporal ×2 (`time_conv`).

    Temporal resampling skips the very first frame (group): the first latent decodes to one
    frame and the first video frame encodes to one latent. That is what makes T latents give
    4T − 3 frames.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; known: {', '.join(self.MODES)}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _upsample_time(self, x: Tensor, cache: CausalCache) -> Tensor:
        if cache.get(self.time_conv) is None:
            # First latent: no temporal upsampling. Later calls see zeros as the past, exactly as
            # the reference's first-frame marker does (its zero padding and zero cache frames).
            b, c, _, h, w = x.shape
            cache.set(self.time_conv, x.new_zeros(b, c, CACHE_T, h, w))
            return x
        y = self.time_conv.step(x, cache)
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w)
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c2 // 2, t * 2, h, w)

    def _downsample_time(self, x: Tensor, cache: CausalCache) -> Tensor:
        past = cache.get(self.time_conv)
        cache.set(self.time_conv, x[:, :, -1:].clone())
        if past is None:  # first frame: no temporal downsampling
            return x
        return self.time_conv(torch.cat([past, x], dim=2))

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _run_blocks(blocks: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    for block in blocks:
        x = block(x, cache)
    return x


def _run_head(head: nn.Sequential, x: Tensor, cache: CausalCache) -> Tensor:
    for layer in head:
        x = layer.step(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class Encoder3d(nn.Module):
    """Video [B, 3, t, H, W] → [B, out_dim, t', H/8, W/8], one frame group per call."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        attn_scales: Sequence[float],
        temporal_downsample: Sequence[bool],
        dropout: float,
    ) -> None:
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, stage_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, stage_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(stage_dim))
                in_dim = stage_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(stage_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = _middle(dims[-1], dropout)
        self.head = _head(dims[-1], out_dim)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1.step(x, cache)
        x = _run_blocks(self.downsamples, x, cache)
        x = _run_blocks(self.middle, x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """One latent frame [B, z_dim, 1, h, w] → 1 frame (first call) or 4 frames, [B, 3, ·, 8h, 8w]."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        attn_scales: Sequence[float],
        temporal_upsample: Sequence[bool],
        dropout: float,
    ) -> None:
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        blocks: list[nn.Module] = []
        for i, (in_dim, stage_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's Resample halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, stage_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(stage_dim))
                in_dim = stage_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(stage_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, z: Tensor, cache: CausalCache) -> Tensor:
        x = self.conv1.step(z, cache)
        x = _run_blocks(self.middle, x, cache)
        x = _run_blocks(self.upsamples, x, cache)
        return _run_head(self.head, x, cache)


def _stats(values: Tensor | Sequence[float] | None, default: Sequence[float], z_dim: int, name: str) -> Tensor:
    if values is None:
        if z_dim != len(default):
            raise ValueError(f"z_dim {z_dim}: pass {name} explicitly (the Wan2.1 constants have {len(default)})")
        values = default
    out = torch.as_tensor(values, dtype=torch.float32).detach().clone().reshape(-1)
    if out.numel() != z_dim:
        raise ValueError(f"{name} has {out.numel()} values, expected z_dim = {z_dim}")
    return out


class WanVAE(nn.Module):
    """Wan2.1 ``WanVAE_``: causal encoder/decoder plus the 1×1×1 ``conv1``/``conv2`` around them.

    Public inputs and outputs live in the normalized latent space the DiT uses:
    ``encode`` returns (mu − mean)/std and ``decode`` takes z_norm. Decoded video is raw
    (not clamped), [B, 3, 4T − 3, 8h, 8w].
    """

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_scales: Sequence[float] = (),
        temporal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
        latent_mean: Tensor | Sequence[float] | None = None,
        latent_std: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(temporal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(dim_mult) - 1} entries, got {len(temporal_downsample)}")
        self.z_dim = z_dim
        self.temporal_factor = 2 ** sum(bool(t) for t in temporal_downsample)
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        attn_scales = tuple(attn_scales)
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales, temporal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temporal_downsample[::-1], dropout)
        # Not in the checkpoint: the statistics are the wrapper's constants, not weights.
        self.register_buffer("latent_mean", _stats(latent_mean, WAN21_LATENT_MEAN, z_dim, "latent_mean"), persistent=False)
        self.register_buffer("latent_std", _stats(latent_std, WAN21_LATENT_STD, z_dim, "latent_std"), persistent=False)

    # ---- construction / loading -------------------------------------------------------------

    @staticmethod
    def config_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor kwargs from a config dict (accepts the reference's `temperal_downsample`)."""
        kwargs: dict[str, Any] = {}
        for key in ("dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "dropout"):
            if key in config:
                kwargs[key] = config[key]
        for key in ("temporal_downsample", "temperal_downsample"):
            if key in config:
                kwargs["temporal_downsample"] = [bool(v) for v in config[key]]
        return kwargs

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "WanVAE":
        return cls(**{**cls.config_kwargs(config), **overrides})

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in self.state_dict().items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], **kwargs: Any) -> "WanVAE":
        """Build and load in eval mode; raises CheckpointError naming every missing, unexpected
        or mis-shaped key. `dim` is read from the weights when not given."""
        if kwargs.get("dim") is None:
            kwargs["dim"] = _infer_dim(state)
        model = cls(**kwargs)
        check_state_dict(dict(state), model.expected_shapes())
        model.load_state_dict(dict(state), strict=True)
        return model.eval()

    # ---- latent normalization ---------------------------------------------------------------

    def _stat(self, values: Tensor | None, own: Tensor, like: Tensor) -> Tensor:
        values = own if values is None else torch.as_tensor(values)
        return values.to(device=like.device, dtype=like.dtype).reshape(1, -1, 1, 1, 1)

    def normalize(self, mu: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """(mu − mean)/std, computed as (mu − mean)·(1/std) like the reference."""
        inv_std = 1.0 / self._stat(std, self.latent_std, mu)
        return (mu - self._stat(mean, self.latent_mean, mu)) * inv_std

    def denormalize(self, z_norm: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """z_norm·std + mean, computed as z_norm/(1/std) + mean like the reference."""
        inv_std = 1.0 / self._stat(std, self.latent_std, z_norm)
        return z_norm / inv_std + self._stat(mean, self.latent_mean, z_norm)

    # ---- decode / encode --------------------------------------------------------------------

    def decode_latents(self, z: Tensor, cache: CausalCache) -> Tensor:
        """De-normalized latents [B, z, T, h, w] → frames, continuing the stream in `cache`.

        Runs one latent frame at a time (the reference's order), which is what makes any
        chunking of the same latents produce bit-identical frames.
        """
        frames = [self.decoder(self.conv2(z[:, :, i : i + 1]), cache) for i in range(z.shape[2])]
        if not frames:
            b, _, _, h, w = z.shape
            s = self.spatial_factor
            return z.new_zeros(b, 3, 0, h * s, w * s)
        return torch.cat(frames, dim=2)

    def decode(self, z_norm: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """One-shot decode of a whole latent video: [B, z, T, h, w] → raw [B, 3, 4T − 3, 8h, 8w]."""
        _check_latents(z_norm, self.z_dim)
        return self.decode_latents(self.denormalize(z_norm, mean, std), CausalCache())

    def encode(self, video: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """Video [B, 3, 1 + 4k, H, W] in [−1, 1] → normalized mean latent [B, z, 1 + k, H/8, W/8]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        t, f = video.shape[2], self.temporal_factor
        if t < 1 or (t - 1) % f:
            raise ValueError(f"video has {t} frames; the encoder needs 1 + {f}·k")
        cache = CausalCache()
        groups = [video[:, :, :1]] + [video[:, :, i : i + f] for i in range(1, t, f)]
        out = torch.cat([self.encoder(g, cache) for g in groups], dim=2)
        mu = self.conv1(out)[:, : self.z_dim]
        return self.normalize(mu, mean, std)

    def stream_decoder(self, mean: Tensor | None = None, std: Tensor | None = None) -> "WanVAEStreamDecoder":
        return WanVAEStreamDecoder(self, mean, std)


class WanVAEStreamDecoder:
    """One decode stream: push latent chunks in order, get their frames; caches carry over.

    The concatenated outputs equal ``WanVAE.decode`` of the concatenated latents bit-exactly.
    All state lives here, so several streams can decode side by side with one model.
    """

    def __init__(self, vae: WanVAE, mean: Tensor | None = None, std: Tensor | None = None) -> None:
        self.vae = vae
        self.mean = mean
        self.std = std
        self.cache = CausalCache()
        self.latents_seen = 0
        self._geometry: tuple[Any, ...] | None = None

    def reset(self) -> None:
        """Start a new video: forget every cached frame."""
        self.cache.clear()
        self.latents_seen = 0
        self._geometry = None

    def frames_for(self, latents: int) -> int:
        """How many frames the next push of `latents` latent frames returns."""
        if latents == 0:
            return 0
        f = self.vae.temporal_factor
        return latents * f - (f - 1 if self.latents_seen == 0 else 0)

    @torch.no_grad()
    def push(self, z_norm: Tensor) -> Tensor:
        """Normalized latents [B, z, T, h, w] (the next T of the stream) → raw frames [B, 3, n, 8h, 8w]."""
        _check_latents(z_norm, self.vae.z_dim)
        b, _, t, h, w = z_norm.shape
        geometry = (b, h, w, z_norm.dtype, z_norm.device)
        if self._geometry is not None and geometry != self._geometry:
            raise ValueError(f"chunk (B, h, w, dtype, device) = {geometry} differs from the stream's "
                             f"{self._geometry}; call reset() to start a new stream")
        self._geometry = geometry
        frames = self.vae.decode_latents(self.vae.denormalize(z_norm, self.mean, self.std), self.cache)
        self.latents_seen += t
        return frames


def _check_latents(z: Tensor, z_dim: int) -> None:
    if z.ndim != 5 or z.shape[1] != z_dim:
        raise ValueError(f"latents must be [B, {z_dim}, T, h, w] (VAE layout), got {tuple(z.shape)}")


def _infer_dim(state: Mapping[str, Tensor]) -> int:
    for key, axis in (("encoder.conv1.weight", 0), ("decoder.head.2.weight", 1)):
        if key in state:
            return int(state[key].shape[axis])
    raise CheckpointError("cannot infer the VAE base dim: neither encoder.conv1.weight nor "
                          "decoder.head.2.weight is in the state dict (pass dim=...)")


def load_wan_vae(
    path: str | Path,
    config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` (or a .safetensors with the same keys) into a WanVAE in eval mode."""
    state = read_tensors(path)
    non_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if non_tensors:
        raise CheckpointError(f"{path}: not a flat state dict; non-tensor entries: {', '.join(non_tensors[:20])}")
    return WanVAE.from_state_dict(state, **{**WanVAE.config_kwargs(config or {}), **kwargs})
