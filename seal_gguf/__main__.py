"""`python -m seal_gguf` is the `seal-gguf` command."""

from seal_gguf.cli import main

main()
