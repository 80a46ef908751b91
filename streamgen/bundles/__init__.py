"""Servable models: a DiT with its text encoder, decoder and stream settings (`ModelBundle`), the
built-in bundles, the model families of `configs/models/*.yaml` and their real checkpoints. Above
`models/` (nn.Modules and checkpoint I/O) and `engine/` (streams), below serving."""
