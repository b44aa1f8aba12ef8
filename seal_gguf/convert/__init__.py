"""llama.cpp's engines: HF -> GGUF with the pinned converter (to_gguf), quantization, GGUF -> HF (from_gguf)."""
