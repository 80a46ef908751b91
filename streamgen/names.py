"""Stream option names shared by the engine and every command that offers them, importable without torch
(the CLI parser stays light)."""

SAMPLERS = ("few_step", "rolling")  # streamgen.sampling: per-chunk few-step, rolling-window joint denoising
SCHEDULES = ("exact", "timestep-slot")  # streamgen.engine.execution: one chunk at a time, or pipelined slots
