"""The S2V DiT of LiveAvatar (`CausalWanModel_S2V`, spec §2.3): the Wan2.1 DiT (same block keys) plus
`cond_encoder`, `trainable_cond_mask`, `frame_packer`, `casual_audio_encoder` and `audio_injector`.

Two kinds of call: `prefill` runs the cond tokens (reference + FramePack motion) at t = 0 through every
block and stores their un-roped keys in a `CondCache`; `forward` denoises one block of noisy frames,
attending through a `StreamAttention` (its step's ring + the re-roped cond cache), with audio injected
after the listed blocks. Noisy tokens use their frame's modulation slot, cond tokens the t = 0 slot.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import SelfAttentionContext, TokenGrid
from ..dit import Block, CrossKV, WanDiT
from .audio import AudioTokens, CausalAudioEncoder
from .cache import CondCache, PrefillAttention
from .config import S2VConfig
from .injector import AudioInjector
from .motion import FramePackMotioner, TokenPositions, grid_positions
from .rope import S2VRope

NOISY, REF, MOTION = 0, 1, 2  # rows of trainable_cond_mask (token types)
Observer = Callable[[str, Tensor], None]


class S2VBlock(Block):
    """The Wan2.1 block; the reference casts the cross-attention input to bf16 before norm3 (quirk 1)."""

    def __init__(self, cfg: S2VConfig, index: int) -> None:
        super().__init__(cfg, index)
        self.bf16_cross_input = cfg.emulate_bf16_cross_input

    def cross_input(self, x: Tensor) -> Tensor:
        if not self.bf16_cross_input:
            return self.norm3(x)
        return self.norm3(x.to(torch.bfloat16)).to(x.dtype)


class S2VDiT(WanDiT):
    """[B, C, F, H, W] noisy latents + per-frame t [B, F] + the block's audio -> flow [B, C, F, H, W]."""

    block_class = S2VBlock
    cfg: S2VConfig

    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__(cfg)
        self.rope = S2VRope(cfg.head_dim, cfg.rope_theta, cfg.rope_max_frames, cfg.emulate_fp16_rope)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.trainable_cond_mask = nn.Embedding(3, cfg.dim)
        self.frame_packer = FramePackMotioner(cfg)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)
        self.audio_injector = AudioInjector(cfg)

    def _patches(self, conv: nn.Conv3d, x: Tensor) -> Tensor:
        return conv(x.to(conv.weight.dtype)).flatten(2).transpose(1, 2)

    def cond_sequence(self, ref: Tensor, motion: Tensor) -> tuple[Tensor, TokenPositions, Tensor]:
        """Reference latent [B, C, 1, H, W] and motion latents [B, C, T, H, W] -> cond tokens [B, N, dim],
        their positions (reference at `ref_rope_frame`) and the reference-token mask [N]."""
        ref_tokens = self._patches(self.patch_embedding, ref) + self.trainable_cond_mask.weight[REF]
        motion_tokens, motion_pos = self.frame_packer(motion.to(self.patch_embedding.weight.dtype))
        motion_tokens = motion_tokens + self.trainable_cond_mask.weight[MOTION]
        grid = self.token_grid(ref)
        start = self.cfg.ref_rope_frame
        ref_pos = grid_positions(torch.arange(start, start + grid.frames), torch.arange(grid.height), torch.arange(grid.width))
        is_ref = torch.arange(ref_tokens.shape[1] + motion_tokens.shape[1]) < ref_tokens.shape[1]
        return torch.cat([ref_tokens, motion_tokens], dim=1), TokenPositions.cat([ref_pos, motion_pos]), is_ref

    def prefill(self, ref: Tensor, motion: Tensor, cross: CrossKV, cache: CondCache) -> None:
        """The sink prefill at t = 0: fills `cache` (overwriting it) with every layer's cond keys/values."""
        tokens, cache.positions, cache.is_ref = self.cond_sequence(ref, motion)
        _, e0 = self.embed_time(torch.zeros(tokens.shape[0], 1, device=tokens.device))  # the t = 0 slot
        grid = TokenGrid(1, 1, tokens.shape[1])  # one modulation "frame" spanning every cond token
        attn = PrefillAttention(self.rope, cache)
        for block in self.blocks:
            tokens = block(tokens, e0, grid, cross[block.index], attn)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, audio: AudioTokens, cross: CrossKV,
                attn: SelfAttentionContext, observe: Observer | None = None) -> Tensor:
        """One denoising call; `cond` are the pose latents of the block's frames, `observe(name, tokens)`
        sees `block_out.<l>` and `after_audio.<l>`."""
        grid = self.token_grid(x)
        tokens = self._patches(self.patch_embedding, x) + self._patches(self.cond_encoder, cond)
        tokens = tokens + self.trainable_cond_mask.weight[NOISY]
        e, e0 = self.embed_time(t)
        for block in self.blocks:
            tokens = block(tokens, e0, grid, cross[block.index], attn)
            if observe:
                observe(f"block_out.{block.index}", tokens)
            if block.index in self.audio_injector.position:
                tokens = self.audio_injector(block.index, tokens, audio)
                if observe:
                    observe(f"after_audio.{block.index}", tokens)
        return self.unpatchify(self.head(tokens, e.unflatten(0, t.shape), grid.frames), grid)

    def context(self, text: Tensor) -> Tensor:
        """Encoder output [B, rows, text_dim] zero-padded to text_len rows (cross-attention has no mask)."""
        pad = self.cfg.text_len - text.shape[1]
        return F.pad(text, (0, 0, 0, pad))


def peft_lora_targets(names: list[str], modules: tuple[str, ...]) -> list[str]:
    """PEFT's suffix rule: the weights of modules named `m` or ending in `.m`, m in `modules` (LiveAvatar:
    448 modules, 896 LoRA tensors A and B). Pure name selection; `bundles.family.lora_targets` knows
    block linears only, while LiveAvatar's LoRA also hits the audio injectors."""
    weights = [n.removesuffix(".weight") for n in names if n.endswith(".weight")]
    return [f"{n}.weight" for n in weights if any(n == m or n.endswith(f".{m}") for m in modules)]
