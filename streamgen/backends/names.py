"""Names the CLI offers for backend settings, importable without torch (the parser stays light)."""

SCHEDULERS = ("engine", "threads")  # local backend: one batched engine loop for all streams, or a thread per stream
