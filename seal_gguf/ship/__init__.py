"""Shipping a GGUF: chat, an OpenAI-compatible server, an Ollama Modelfile, a model card."""
