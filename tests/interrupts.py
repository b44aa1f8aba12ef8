"""Sending Ctrl-C to a command under test."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """preexec_fn for a command that the test interrupts: SIGINT acts as in a terminal even when the
    test run itself ignores it (a shell starts background jobs such as `pytest &` with SIGINT
    ignored, and children inherit that, so Python would never raise KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
