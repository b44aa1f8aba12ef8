"""HF checkpoint -> GGUF with llama.cpp's own converter, folding SEAL scales on the way.

The converter is convert_hf_to_gguf.py with its `conversion/` package and its own gguf-py, from
exactly the llama.cpp vendored in the installed llama-cpp-python (the PyPI gguf package lags
behind it). Its source distribution is fetched once with pip, the converter's files are
extracted into a user cache and patches/ are applied (they add --seal-scales: o_proj columns
scaled inside the converter's lazy tensor pipeline, seal.* metadata). `--llama-cpp DIR` or
$SEAL_GGUF_LLAMA_CPP use a local llama.cpp checkout instead.

Types the converter cannot write (q4_k_m, iq4_xs, ...) go through a lossless intermediate GGUF
beside the output, quantized by llama.cpp's quantizer and then removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from seal_gguf.constants import F16_MAX, ScalesMeta
from seal_gguf.convert.quantize import (
    QUANT_TYPES,
    QuantPlan,
    check_quant_options,
    check_written_gguf,
    engine_failure,
    run_engine,
    run_quantizer,
    warn_on_stderr,
)
from seal_gguf.errors import EngineError, InputError, ScalesError
from seal_gguf.fileio import atomic_file, check_output_path, no_room_error
from seal_gguf.fold.hf import max_folded_abs
from seal_gguf.model.architectures import ModelLayout, layout_from_config, read_config, supported_model_types
from seal_gguf.model.checkpoint import (
    ShardHeader,
    check_base_fingerprint,
    check_not_folded,
    locate_o_proj,
    read_headers,
    read_tensor,
)
from seal_gguf.model.rope import RopeScaling, check_gguf_extension, extend_config, extended_model_dir
from seal_gguf.scales import SealScales, load_scales

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_ENV = "SEAL_GGUF_LLAMA_CPP"
CACHE_ENV = "SEAL_GGUF_CACHE"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
SEAL_MODULE = "seal_scales.py"  # the file the patch adds next to the converter
# What convert_hf_to_gguf.py reads at run time, relative to the llama.cpp root.
CONVERTER_FILES = (CONVERTER_SCRIPT, "LICENSE", "conversion/", "gguf-py/", "models/templates/")
# seal_gguf/patches is a link to the top-level patches/ in a checkout, a real folder in a wheel.
PATCHES_DIR = Path(__file__).resolve().parent / "patches"
READY_MARKER = ".seal-gguf-ready"
# the converter's own progress bar: "Writing:  45%|████▌     | 123M/270M ..."
CONVERTER_STEP = re.compile(r"Writing:\s+(?P<done>\d+)%")
SAFETENSORS_TO_OUTTYPE = {"F32": "f32", "BF16": "bf16", "F16": "f16"}


# -- what to produce --

def output_plan(outtype: str, imatrix: Path | None, attn_output_type: str | None) -> tuple[str, QuantPlan | None]:
    """The outtype's name, and the quantization to run after the converter (None: the converter writes it)."""
    name = outtype.lower()
    if name not in CONVERTER_TYPES and name not in QUANT_TYPES:
        raise InputError(f"unsupported outtype {outtype!r}; choose one of {', '.join(CONVERTER_TYPES)} "
                         f"(written by the converter) or a llama-quantize type: "
                         f"{', '.join(t for t in QUANT_TYPES if t not in CONVERTER_TYPES)}")
    wants_quantizer = imatrix is not None or attn_output_type is not None
    if name in ("f32", "f16", "bf16") and wants_quantizer:
        raise InputError(f"--imatrix and --attn-output-type apply to quantized types, not {name}")
    if name in CONVERTER_TYPES and not wants_quantizer:
        return name, None
    return name, check_quant_options(name, imatrix, attn_output_type)


def lossless_outtype(headers: list[ShardHeader]) -> str:
    """The converter outtype that keeps every weight exactly: the checkpoint's own float type."""
    dtypes = {e.dtype for h in headers for e in h.tensors.values() if len(e.shape) >= 2}
    if len(dtypes) == 1 and next(iter(dtypes)) in SAFETENSORS_TO_OUTTYPE:
        return SAFETENSORS_TO_OUTTYPE[next(iter(dtypes))]
    return "f32"


# -- provisioning the converter --

def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seal-gguf"


def pinned_llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise EngineError("llama-cpp-python is not installed; pip install seal-gguf's dependencies") from None


def patch_files() -> list[Path]:
    patches = sorted(PATCHES_DIR.glob("*.patch"))
    if not patches:
        raise EngineError(f"{PATCHES_DIR}: no converter patches found; reinstall seal-gguf")
    return patches


def download_sdist(version: str, dest: Path) -> Path:
    """llama-cpp-python's source distribution (which vendors llama.cpp), via pip, without building it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        reason = engine_failure(result.stdout + result.stderr)
        raise EngineError(
            f"cannot fetch llama-cpp-python {version}'s source for llama.cpp's converter (pip: {reason}); "
            f"offline, pass --llama-cpp DIR (a llama.cpp checkout with patches/ applied) or set {LLAMA_CPP_ENV}")
    return found[0]


def extract_converter(sdist: Path, dest: Path) -> Path:
    """Extract the converter's files from the sdist's vendor/llama.cpp into dest (the llama.cpp root)."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            _, sep, rel = member.name.partition("/vendor/llama.cpp/")
            if not sep or not rel.startswith(CONVERTER_FILES) or not (member.isfile() or member.isdir()):
                continue
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise EngineError(f"{sdist}: unsafe path in archive: {member.name}")
            member.name = rel
            members.append(member)
        if not any(m.name == CONVERTER_SCRIPT for m in members):
            raise EngineError(f"{sdist}: holds no vendor/llama.cpp/{CONVERTER_SCRIPT}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python < 3.10.12: the members were checked above
            tar.extractall(dest, members=members)
    return dest


def apply_patch(patch: Path, root: Path) -> None:
    """Apply a unified diff (as `patch -p1` / `git apply` would), strictly: every hunk must match exactly.

    Done in Python because neither patch nor git is installed everywhere.
    """
    for old_name, new_name, hunks in _parse_patch(patch):
        target = root / new_name
        if old_name is None:
            if target.exists():
                raise EngineError(f"{patch}: {new_name} already exists in {root}")
            lines: list[str] = []
        else:
            lines = (root / old_name).read_text(encoding="utf-8").splitlines(keepends=True)
        shift = 0
        for start, old, new in hunks:
            at = start - 1 + shift if old else start + shift
            if lines[at:at + len(old)] != old:
                raise EngineError(f"{patch}: does not apply to {root / new_name} (hunk at line {start}); "
                                  "this llama.cpp version differs from the one the patch was made for")
            lines[at:at + len(old)] = new
            shift += len(new) - len(old)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(lines), encoding="utf-8")


def _parse_patch(patch: Path) -> list[tuple[str | None, str, list[tuple[int, list[str], list[str]]]]]:
    files: list[tuple[str | None, str, list[tuple[int, list[str], list[str]]]]] = []
    rows = patch.read_text(encoding="utf-8").splitlines(keepends=True)
    i = 0
    while i < len(rows):
        if rows[i].startswith("--- ") and i + 1 < len(rows) and rows[i + 1].startswith("+++ "):
            old = rows[i][4:].strip().split("\t")[0]
            new = rows[i + 1][4:].strip().split("\t")[0]
            files.append((None if old == "/dev/null" else old.partition("/")[2], new.partition("/")[2], []))
            i += 2
            continue
        header = re.match(r"^@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@", rows[i])
        if header:
            if not files:
                raise EngineError(f"{patch}: hunk before any file header")
            n_old, n_new = int(header.group(2) or 1), int(header.group(3) or 1)
            old_lines: list[str] = []
            new_lines: list[str] = []
            i += 1
            while (len(old_lines) < n_old or len(new_lines) < n_new) and i < len(rows):
                tag, text = rows[i][:1], rows[i][1:]
                if tag in (" ", "\n"):
                    text = text or "\n"
                    old_lines.append(text)
                    new_lines.append(text)
                elif tag == "-":
                    old_lines.append(text)
                elif tag == "+":
                    new_lines.append(text)
                else:
                    raise EngineError(f"{patch}: malformed hunk line {i + 1}")
                i += 1
            files[-1][2].append((int(header.group(1)), old_lines, new_lines))
            continue
        i += 1
    if not files:
        raise EngineError(f"{patch}: not a unified diff")
    return files


def provision_converter(progress: bool = True) -> Path:
    """The patched converter of the pinned llama.cpp in the user cache, made on first use."""
    version = pinned_llama_cpp_version()
    patches = patch_files()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in patches)).hexdigest()[:12]
    root = cache_root()
    target = root / f"llama.cpp-{version}-{digest}"
    if (target / READY_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".provision-", dir=root) as work, \
            tqdm(total=3, desc="fetch llama.cpp converter", disable=not progress, leave=False) as bar:
        sdist = download_sdist(version, Path(work) / "download")
        bar.update()
        staging = extract_converter(sdist, Path(work) / "llama.cpp")
        bar.update()
        for patch in patches:
            apply_patch(patch, staging)
        marker = {"llama_cpp_python": version, "patches": [p.name for p in patches], "sha256": digest}
        (staging / READY_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        bar.update()
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / READY_MARKER).is_file():  # a leftover, not a parallel run's result
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
    return target


def local_converter(checkout: Path, need_seal: bool) -> Path:
    """A user's llama.cpp checkout, checked to hold the converter (and the patch when scales are folded)."""
    checkout = Path(checkout).expanduser().resolve()
    if not (checkout / CONVERTER_SCRIPT).is_file() or not (checkout / "gguf-py" / "gguf").is_dir():
        raise InputError(f"{checkout}: not a llama.cpp checkout (needs {CONVERTER_SCRIPT} and gguf-py/)")
    if need_seal:
        script = (checkout / CONVERTER_SCRIPT).read_text(encoding="utf-8", errors="replace")
        if not (checkout / SEAL_MODULE).is_file() or "--seal-scales" not in script:
            patch = patch_files()[0]
            raise InputError(f"{checkout}: its converter lacks --seal-scales; apply seal-gguf's patch there: "
                             f"cd {checkout} && git apply {patch}  (or: patch -p1 < {patch})")
    return checkout


def converter_root(llama_cpp: Path | None, need_seal: bool, progress: bool = True) -> Path:
    checkout = llama_cpp or os.environ.get(LLAMA_CPP_ENV)
    if checkout:
        return local_converter(Path(checkout), need_seal)
    return provision_converter(progress)


# -- running it --

def run_converter(root: Path, model_dir: Path, out_file: Path, outtype: str, scales: Path | None, *,
                  progress: bool = True, verbose: bool = False) -> None:
    cmd = [sys.executable, str(root / CONVERTER_SCRIPT), str(model_dir.resolve()),
           "--outfile", str(out_file), "--outtype", outtype]
    if scales is not None:
        cmd += ["--seal-scales", str(scales.resolve())]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "gguf-py"), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no network; never hang on one
    rc, log = run_engine(cmd, desc=f"convert {outtype}", unit="%", step=CONVERTER_STEP, progress=progress,
                         verbose=verbose, env=env)
    if rc != 0:
        full = no_room_error(out_file.parent)
        if full is not None:
            raise full
        hint = "" if verbose else " (run with --verbose for the converter's full log)"
        raise EngineError(f"{model_dir}: llama.cpp's converter failed: {engine_failure(log)}{hint}")
    if not out_file.is_file() or out_file.stat().st_size == 0:
        raise EngineError(f"llama.cpp's converter reported success but wrote nothing to {out_file}")


@contextmanager
def intermediate_file(out_path: Path, outtype: str) -> Iterator[Path]:
    """A scratch GGUF beside the output, removed afterwards whatever happens."""
    fd, name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=f".{outtype}.gguf", dir=out_path.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


# gguf-py quantizes a tensor whose rows are not whole blocks of the outtype as F16 instead (the
# converter's "falling back to F16"); block sizes of the types the converter writes.
CONVERTER_BLOCK = {"q8_0": 32}


def stored_attn_output_type(converter_type: str, plan: QuantPlan | None, layout: ModelLayout) -> str | None:
    """The type the attn_output tensors end up stored in, where it can be known before converting:
    the converter's outtype, or F16 where it falls back; --attn-output-type (the quantizer's own
    fallbacks are found in the written file by check_written_gguf); None: chosen by the quantizer."""
    if plan is not None:
        return plan.attn_output_type
    block = CONVERTER_BLOCK.get(converter_type)
    return "f16" if block and layout.attn_width % block else converter_type


def check_f16_range(model_dir: Path, headers: list[ShardHeader], layout: ModelLayout, scales: SealScales,
                    converter_type: str, plan: QuantPlan | None) -> None:
    """Refuse folds whose o_proj weights would leave float16's range where float16 stores them: the
    converter's f16 (or its F16 fallback for rows that are not whole blocks), an f16 intermediate
    before quantizing, or --attn-output-type f16."""
    stored = stored_attn_output_type(converter_type, plan, layout)
    where: str | None = None  # what stores the weights in float16, if anything
    if stored == "f16":
        if plan is not None:
            where = "--attn-output-type f16"
        elif converter_type == "f16":
            where = "--outtype f16"
        else:
            where = (f"the converter's F16 fallback for attn_output (its rows of {layout.attn_width} are not "
                     f"whole {converter_type.upper()} blocks of {CONVERTER_BLOCK[converter_type]})")
    elif plan is not None and converter_type == "f16":
        where = "the float16 intermediate this float16 checkpoint is quantized from"
    if where is None:
        return
    peak = max_folded_abs(model_dir, layout, scales)
    if peak > F16_MAX:
        raise ScalesError(f"folded o_proj weights reach |w| = {peak:.6g}, beyond float16's range "
                          f"({F16_MAX:g}) used by {where}; use --outtype bf16 or f32"
                          + (" from a bfloat16 or float32 checkpoint" if converter_type == "f16" and plan else "")
                          + (", or --attn-output-type bf16 or f32" if plan is None and converter_type != "f16" else ""))


def convert_to_gguf(model_dir: Path, out_path: Path, outtype: str = "f16", scales: Path | None = None, *,
            imatrix: Path | None = None, attn_output_type: str | None = None, llama_cpp: Path | None = None,
            rope: RopeScaling | None = None, force: bool = False, verbose: bool = False,
            progress: bool = True, warn: Callable[[str], None] | None = warn_on_stderr) -> Path:
    """Convert an HF model folder to GGUF; with scales, fold them into o_proj during conversion.

    scales=None is the plain baseline through the same converter. rope extends the context: the
    converter reads the extended config.json (seal_gguf.model.rope) and writes the matching GGUF keys,
    checked here before the file is kept. The written GGUF is checked for non-finite weights before it
    is kept, and `warn` is told when llama.cpp stores attn_output in another type than asked for, or
    when the scales were learned on another checkpoint and --force folds them anyway.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    name, plan = output_plan(outtype, imatrix, attn_output_type)
    config = read_config(model_dir)
    if rope is not None:
        rope = rope.resolved(config, str(model_dir / "config.json"))
        extend_config(config, rope, str(model_dir / "config.json"))  # refused before any long work
    headers = read_headers(model_dir)
    converter_type = name if plan is None else lossless_outtype(headers)
    if scales is not None:
        scales = Path(scales)
        layout = layout_from_config(config, model_dir / "config.json")
        check_not_folded(config, str(model_dir), force)
        sealed = load_scales(scales, layout)
        header, entry = locate_o_proj(headers, layout)[0]
        mismatch = check_base_fingerprint(sealed.metadata.get(ScalesMeta.BASE_FINGERPRINT),
                                          read_tensor(entry, header.path), scales, model_dir, force)
        if mismatch and warn is not None:
            warn(mismatch)
        check_f16_range(model_dir, headers, layout, sealed, converter_type, plan)
    elif config.get("model_type") in supported_model_types():
        # weights that do not fit config.json would convert into a GGUF llama.cpp cannot load
        locate_o_proj(headers, layout_from_config(config, model_dir / "config.json"))
    check_output_path(out_path, force, inputs=[scales, imatrix])  # before fetching the converter, which can take a while
    root = converter_root(llama_cpp, need_seal=scales is not None, progress=progress)
    with atomic_file(out_path, force=force) as tmp, extended_model_dir(model_dir, rope) as source:
        if plan is None:
            run_converter(root, source, tmp, converter_type, scales, progress=progress, verbose=verbose)
            if rope is not None:
                check_gguf_extension(tmp, config, rope)
            expected = converter_type if converter_type in CONVERTER_BLOCK else None
            check_written_gguf(tmp, expected, folded=scales is not None, warn=warn)
        else:
            with intermediate_file(out_path, converter_type) as mid:
                run_converter(root, source, mid, converter_type, scales, progress=progress, verbose=verbose)
                if rope is not None:
                    check_gguf_extension(mid, config, rope)
                check_written_gguf(mid, None, folded=scales is not None)
                run_quantizer(mid, tmp, plan, progress=progress, verbose=verbose)
            check_written_gguf(tmp, plan.attn_output_type, folded=scales is not None, warn=warn)
    return out_path
