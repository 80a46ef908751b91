"""streamgen: serve chunk-causal video diffusion models (Wan2.1 Self-Forcing family) as live streams.

`streamgen.open_stream(model, prompt, backend=...)` is the entry point for code (see streamgen/api.py);
it is imported on first use, so `import streamgen` (and the CLI's parser) stays light."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("open_stream", "OpenStream"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'streamgen' has no attribute {name!r}")
