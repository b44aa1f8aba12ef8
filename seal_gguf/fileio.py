"""Atomic outputs: write beside the target under a temporary name, rename at the end.

An error or Ctrl-C removes the temporary file, so no half-written output is ever left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seal_gguf.errors import InputError, OutputExistsError, SealError

# errno values that mean the disk refused the output, not that an input is bad
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Free space below which a failed write is put down to a full disk (for writers that hide the errno).
LOW_SPACE = 1 << 20


def check_output_path(path: Path, force: bool, folder: bool = False,
                      inputs: Iterable[Path | None] = ()) -> None:
    """Refuse an output that exists (unless force), that is one of the inputs, or that is a folder
    where a file goes, or the reverse: --force replaces an old output, never what is being read."""
    if path.exists() and path.is_dir() != folder:
        raise InputError(f"{path}: is a {'file' if folder else 'folder'}; give the path of the "
                         f"{'folder' if folder else 'file'} to write")
    if path.exists() and any(given is not None and Path(given).exists() and os.path.samefile(path, given)
                             for given in inputs):
        raise InputError(f"{path}: is also an input; write the output to another path")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists (use --force to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent}: output folder is not writable")


def _umask() -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def no_room_error(path: Path, exc: BaseException | None = None) -> InputError | None:
    """The error to report when writing `path` (an output, or the folder it goes to) failed for want of room.

    Decided by the errno when there is one, else by the free space left while the partial output
    still exists: llama.cpp and safetensors report a full disk without an errno.
    """
    folder = path if path.is_dir() else path.parent
    advice = "free some space or choose another folder"
    if isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS:
        reason = exc.strerror
        if exc.errno == errno.EFBIG:
            advice = "choose a folder on a filesystem that takes files this large"
    else:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return None
        if free >= LOW_SPACE:
            return None
        reason = f"no space left on device: {free} bytes free"
    return InputError(f"{path}: writing failed ({reason}); {advice}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _discard(tmp: Path, path: Path, exc: BaseException) -> InputError | None:
    """Remove the failed output tmp of path; return the error to raise instead of exc when the disk refused it."""
    # judged while the partial output still fills the disk; typed errors already say what went wrong
    plain = isinstance(exc, Exception) and not isinstance(exc, SealError)
    full = no_room_error(path, exc) if plain else None
    _remove(tmp)
    return full


@contextmanager
def atomic_file(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in path's folder; it becomes `path` only if the block succeeds."""
    path = Path(path)
    check_output_path(path, force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # after the block: writers such as safetensors replace the file, losing a chmod made before
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        full = _discard(tmp, path, exc)
        if full is not None:
            raise full from exc
        raise


@contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Like atomic_file, for an output folder."""
    path = Path(path)
    check_output_path(path, force, folder=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or "."))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
    except BaseException as exc:
        full = _discard(tmp, path, exc)
        if full is not None:
            raise full from exc
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_file(path: Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: expected a {what}, found a folder")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty {what}")
    return path


GGUF_MAGIC = b"GGUF"


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the UTF-8 file at path (config.json, adapter_config.json, ...). Raises InputError,
    naming the file, for one that cannot be read, is not JSON or holds something else than an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def gguf_magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def require_gguf(path: Path) -> Path:
    """A readable file that starts with the GGUF magic; llama.cpp is never handed anything else."""
    path = require_file(Path(path), "GGUF file")
    try:
        magic = gguf_magic(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return path


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
