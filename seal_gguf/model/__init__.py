"""The model as seal-gguf sees it: architectures as data, lazy checkpoint headers, loading, hooks, RoPE."""
