"""`python -m seal_gguf` is the `seal-gguf` command."""

from .cli import main

main()
