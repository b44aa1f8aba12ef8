"""Folding: the scales multiplied into o_proj's input columns, in an HF checkpoint (hf) or a GGUF (gguf)."""
