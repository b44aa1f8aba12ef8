"""The `seal-gguf` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

from . import model_cmds  # noqa: F401  (each module registers its commands on `cli`)
from .app import cli


def main() -> None:
    cli(prog_name="seal-gguf")


__all__ = ["cli", "main"]
