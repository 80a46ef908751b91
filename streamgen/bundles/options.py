"""Command-line options that say how a bundle loads (precision, decoder), shared by `serve`, `render` and
`bench engine`: one vocabulary of flags, one function that turns them into `load_bundle` keywords."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..models.precision import DTYPE_CHOICES, QUANT_MODES
from .family import BUNDLE_DECODERS


def add_bundle_arguments(parser: argparse.ArgumentParser, decoders: Sequence[str] = BUNDLE_DECODERS,
                         default_decoder: str | None = None) -> None:
    """`--dtype --quant --compile --cuda-graphs --decoder` (`bundle_settings` reads them)."""
    g = parser.add_argument_group("model loading")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="DiT weights and activations (default auto: bf16 on CUDA, fp32 on the CPU); the time "
                        "embedding and modulation stay fp32, norms compute in fp32, RoPE in float64")
    g.add_argument("--quant", choices=QUANT_MODES, default="none",
                   help="weight-only quantization of the blocks' attention and FFN linears, per output channel "
                        "(int8 / fp8 e4m3: half the weight memory of bf16; on the CPU no faster)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT (compiles on the first chunk)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each DiT call as CUDA graphs (torch.compile mode reduce-overhead; needs a GPU)")
    g.add_argument("--decoder", choices=decoders, default=default_decoder,
                   help="a model family's frame decoder: vae (the Wan VAE, exact), taehv (TAEHV, real-time, "
                        "needs the family's taehv file), preview (a fixed latent→RGB projection, no file)"
                        + ("; none: no decode" if "none" in decoders else "")
                        + f" (default: {default_decoder or 'vae; built-in models have their own'})")


def bundle_settings(args: argparse.Namespace) -> dict[str, str]:
    """The `load_bundle` keywords (dtype, quant, compile, decoder) the options of `add_bundle_arguments`
    set; defaults are left out, so a command line without them passes nothing. `--cuda-graphs` without a
    GPU is refused here, before the command builds or loads anything."""
    from .bundle import require_cuda_for

    defaults = {"dtype": "auto", "quant": "none", "compile": "none"}
    compile = "cuda-graphs" if args.cuda_graphs else "inductor" if args.compile else "none"
    require_cuda_for(compile)
    given = {"dtype": args.dtype, "quant": args.quant, "compile": compile}
    settings = {k: v for k, v in given.items() if v != defaults[k]}
    if args.decoder is not None:
        settings["decoder"] = args.decoder
    return settings
