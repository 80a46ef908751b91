"""Noise schedule, few-step and rolling samplers, and the DiT call against a cache."""
