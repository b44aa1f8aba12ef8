"""What `seal-gguf inspect` reports for a scales file, a GGUF or a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .architectures import read_config
from .constants import CONFIG_FOLD_KEY, GGUF_SEAL_PREFIX
from .errors import InputError
from .fileio import require_file
from .scales import read_scales, summarize


def gguf_reader(path: Path) -> Any:
    """gguf-py's reader over an existing file; one clear error when it is not a readable GGUF."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises bare ValueError/struct errors on corrupt files
        raise InputError(f"{path}: not a readable GGUF file ({exc})") from None


def gguf_seal_metadata(path: Path) -> dict[str, Any]:
    """The seal.* keys of a GGUF file (empty when it carries no SEAL provenance)."""
    reader = gguf_reader(require_file(Path(path), "GGUF file"))
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith(GGUF_SEAL_PREFIX) or name == "general.architecture":
            out[name] = field.contents()
    return out


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
        return {"kind": "gguf", "path": str(path), "metadata": gguf_seal_metadata(path)}
    scales = read_scales(path)
    return {"kind": "scales", "path": str(path), "metadata": scales.metadata, "sha256": scales.sha256,
            **summarize(scales)}
