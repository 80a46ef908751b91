"""The built-in models' names and stream settings, torch-free: `models list` reads them without loading
a model, and `bundle.py` / `embedded.py` build each bundle's `StreamConfig` from them (the embedded
weights file records the same settings; tests/test_registry.py checks they agree)."""
from __future__ import annotations

from dataclasses import dataclass

from .family import StreamSpec, stream_spec

DEFAULT_MODEL = "embedded"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped in the package: no --model-dir."""

    name: str
    latent: tuple[int, int]  # latent height, width
    stream: StreamSpec

    def stream_config(self, **overrides):
        """The `StreamConfig` it runs with (imports torch)."""
        return self.stream.to_config(self.latent, **overrides)


BUILTINS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel("tiny-random", (8, 8),
                 stream_spec(policy="ema_sink", sampler="few_step", steps=(1000, 750, 500, 250), warp_steps=True,
                             shift=5.0)),
    # chunks of 3 frames, 4 steps at σ = 1, 0.75, 0.5, 0.25 (unwarped: this model is not distilled, and a
    # last step at σ = 0.625 leaves it blurry), clean rerun at t=0, a 9-frame sliding window with
    # slot-relative RoPE (positions 0…8, the same as a 9-frame training clip), no sink.
    BuiltinModel("embedded", (32, 32),
                 stream_spec(policy="window_sink", policy_settings={"capacity_frames": 9, "sink_frames": 0,
                                                                    "rope": "relative"},
                             sampler="few_step", steps=(1000, 750, 500, 250), warp_steps=False, shift=5.0,
                             context_noise=0.0, chunk_frames=3)),
    # the avatar: 16 fps, chunks of 3 frames, the same 4 steps; a 7-frame window whose one-frame sink is
    # the reference (slot 0) and whose other 6 slots hold the previous and the current chunk.
    BuiltinModel("embedded-avatar", (32, 32),
                 stream_spec(policy="window_sink", policy_settings={"capacity_frames": 7, "sink_frames": 1,
                                                                    "rope": "relative"},
                             sampler="few_step", steps=(1000, 750, 500, 250), warp_steps=False, shift=5.0,
                             context_noise=0.0, chunk_frames=3)),
)}
