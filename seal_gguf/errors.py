"""Exception types. The library raises them; the CLI turns each into one line on stderr."""

from __future__ import annotations


class SealError(Exception):
    """Base class: the message is complete and meant for the user."""


class InputError(SealError):
    """A missing, unreadable or malformed input file or folder."""


class ScalesError(SealError):
    """A scales file that does not fit the model, or holds invalid values."""


class ArchitectureError(SealError):
    """A model type seal-gguf does not know how to scale."""


class AlreadyFoldedError(SealError):
    """The model (or GGUF) already carries SEAL scales."""


class OutputExistsError(SealError):
    """The output path exists and --force was not given."""


class EngineError(SealError):
    """llama.cpp's converter or quantizer, or llama-cpp-python, failed."""


class ValidationFailed(SealError):
    """A validation tolerance was exceeded."""
