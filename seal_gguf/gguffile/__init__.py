"""GGUF as a file format: metadata, and opening a GGUF in llama.cpp."""
