"""nn.Modules and their loading: the chunk-causal DiT, RoPE, the attention seam, text encoders, decoders."""
