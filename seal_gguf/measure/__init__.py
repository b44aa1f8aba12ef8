"""Measuring: folded and quantized models against the hooked reference, retrieval accuracy, head effects."""
