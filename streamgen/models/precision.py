"""The precision options' names (torch-free: the CLI's parser offers them without importing torch)."""

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")  # streamgen.bundles.bundle.DTYPES, plus auto
QUANT_MODES = ("none", "int8", "fp8")  # streamgen.models.quant
COMPILE_MODES = ("none", "inductor", "cuda-graphs")  # streamgen.bundles.bundle.prepare_dit
