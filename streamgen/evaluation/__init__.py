"""`streamgen eval`: the embedded model judged by the world's checker (tables in docs/embedded_eval.md)."""
