"""The `seal-gguf` command line: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import signal

# Each module registers its commands on `cli` when imported.
from . import (  # noqa: F401
    convert_cmds,
    demo_cmds,
    eval_cmds,
    gguf_cmds,
    heads_cmds,
    imatrix_cmds,
    model_cmds,
    peft_cmds,
    ship_cmds,
    train_cmds,
    validate_cmds,
)
from .app import Terminated, cli


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main() -> None:
    # `kill` (SIGTERM) cleans up like Ctrl-C: temporary outputs are removed, nothing half-written stays.
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="seal-gguf")


__all__ = ["cli", "main"]
