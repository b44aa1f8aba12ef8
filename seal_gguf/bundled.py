"""The SEAL scales bundled with seal-gguf for the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from seal_gguf.errors import InputError

BUNDLED = {"head": "smollm2-135m-instruct-seal-h.safetensors",
           "channel": "smollm2-135m-instruct-seal-c.safetensors"}
def bundled_scales(granularity: str) -> Path:
    path = Path(str(resources.files("seal_gguf").joinpath("bundled", BUNDLED[granularity])))
    if not path.is_file():
        raise InputError(f"bundled scales {path.name} are missing from this installation; run the demo with --train")
    return path


