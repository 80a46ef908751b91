"""Parallelism inside one stage: DeepSpeed-Ulysses sequence parallelism for offline high-res renders."""
