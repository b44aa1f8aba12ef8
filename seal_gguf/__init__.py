"""seal-gguf: learn SEAL attention scales, fold them into the weights, ship an ordinary GGUF."""

from __future__ import annotations

__version__ = "0.1.0"
