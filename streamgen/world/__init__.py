"""The embedded model's procedural world (data) and its non-learned checker.

Contract: docs/world.md. Data: `parse_prompt`, `Prompt`, `VOCAB`, `prompt_tokens`, `WorldState`,
`render`, `step`, `make_clip`, `sample_batch`. Evaluation: `streamgen.world.checker`,
`streamgen.world.report`.
"""
from .clips import Clip, ClipBatch, make_clip, sample_batch, sample_clips
from .render import (CHANNELS, DIRECTION_DELTAS, FPS, FRAME_SIZE, GRID, OBJECT_BOX, SPEED_PX, SPEED_TOKENS,
                     TOKEN_SIZE, WorldState, object_mask, render, render_states, render_stream, rollout,
                     shape_masks, step)
from .vocab import (ARTICLES, ATTRIBUTES, COLOURS, DEFAULT_PROMPT, DEFAULTS, DIRECTIONS, FILLER_WORDS, NULL_TOKEN,
                    PALETTE, SHAPES, SYNONYMS, TOKEN_OFFSET, TOKENS_PER_PROMPT, VALUES, VOCAB, VOCAB_SIZE, ParsedPrompt,
                    Prompt, all_prompts, parse_prompt, prompt_from_tokens, prompt_tokens)

__all__ = [
    "ARTICLES", "ATTRIBUTES", "CHANNELS", "COLOURS", "DEFAULT_PROMPT", "DEFAULTS", "DIRECTIONS", "DIRECTION_DELTAS",
    "FILLER_WORDS", "FPS", "FRAME_SIZE", "GRID", "NULL_TOKEN", "OBJECT_BOX", "PALETTE", "SHAPES", "SPEED_PX",
    "SPEED_TOKENS", "SYNONYMS", "TOKEN_OFFSET", "TOKENS_PER_PROMPT", "TOKEN_SIZE", "VALUES", "VOCAB", "VOCAB_SIZE",
    "Clip", "ClipBatch", "ParsedPrompt", "Prompt", "WorldState",
    "all_prompts", "make_clip", "object_mask", "parse_prompt", "prompt_from_tokens", "prompt_tokens", "render",
    "render_states", "render_stream", "rollout", "sample_batch", "sample_clips", "shape_masks", "step",
]
