"""LiveAvatar's causal Wan2.2-S2V DiT (spec/avatar.md §2): the Wan2.1 blocks plus the S2V extras
(audio encoder and injectors, FramePack motion tokens, cond encoder, token-type mask) and its caches
(one noisy-key ring per denoising step, an un-roped cond "sink" cache re-roped every call)."""
from .cache import CondCache, StepRing, StreamAttention, ref_shift
from .config import S2VConfig
from .model import S2VDiT, peft_lora_targets

__all__ = ["CondCache", "S2VConfig", "S2VDiT", "StepRing", "StreamAttention", "peft_lora_targets", "ref_shift"]
