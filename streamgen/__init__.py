"""streamgen: serve chunk-causal video diffusion models (Wan2.1 Self-Forcing family) as live streams."""

__version__ = "0.1.0"
