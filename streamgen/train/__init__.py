"""Training of the embedded model (docs/embedded_model.md): `streamgen train`.

config.py        TrainConfig: every setting of a run (torch-free)
data.py          world clips → latent batches, prompt timelines for rollouts
attention.py     the full-sequence attention the training forward uses (block-causal + re-cache blocks)
objectives.py    flow-matching noise levels and the masked denoising loss
self_forcing.py  batched few-step rollouts through the engine (own trajectories recorded), world-as-teacher targets
ema.py           exponential moving average of the weights
engine.py        DeepSpeed on CPU (single process, gloo) or GPU
loop.py          the trainer: phases, checkpoints, resume, progress, logs
evaluate.py      checker metrics of streams generated through the real Stream API
cli.py           `streamgen train` arguments
"""
