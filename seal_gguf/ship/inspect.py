"""What `seal-gguf inspect` reports for a scales file, a GGUF or a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seal_gguf.constants import CONFIG_FOLD_KEY
from seal_gguf.errors import InputError
from seal_gguf.fileio import require_file
from seal_gguf.gguffile.metadata import gguf_seal_metadata
from seal_gguf.gguffile.split import read_gguf_parts
from seal_gguf.model.architectures import read_config
from seal_gguf.scales import read_scales, summarize_scales


def inspect_path(path: Path) -> dict[str, Any]:
    """A dict describing `path`: kind is 'scales', 'gguf' or 'model'."""
    path = Path(path)
    if path.is_dir():
        config = read_config(path)
        return {"kind": "model", "path": str(path), "model_type": config.get("model_type"),
                "seal_fold": config.get(CONFIG_FOLD_KEY)}
    require_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        parts = read_gguf_parts(path)  # a split GGUF: every part there, from one split
        return {"kind": "gguf", "path": str(path), "metadata": gguf_seal_metadata(path), "parts": len(parts)}
    if path.suffix.lower() == ".gguf":
        raise InputError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    scales = read_scales(path)
    return {"kind": "scales", "path": str(path), "metadata": scales.metadata, "sha256": scales.sha256,
            **summarize_scales(scales)}
