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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from seal_gguf.constants import CONFIG_FOLD_KEY, F16_MAX, ScalesMeta
from seal_gguf.convert.quantize import (
    ATTN_OUTPUT_PATTERN,
    FLOAT_TYPES,
    QUANT_TYPES,
    QuantPlan,
    TensorTypes,
    check_quant_options,
    check_written_gguf,
    engine_failure,
    run_engine,
    run_quantizer,
    warn_on_stderr,
    warn_unmatched_patterns,
)
from seal_gguf.errors import EngineError, InputError, ScalesError, SealError
from seal_gguf.fileio import check_output_path, no_room_error, sha256_file
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

TYPE_FIELD = "{type}"  # in -o: replaced by each type's name


def split_outtypes(outtype: str) -> list[str]:
    """--outtype's comma-separated types, lower-cased, in order. Raises InputError for an empty or repeated entry."""
    names = [part.strip().lower() for part in outtype.split(",")]
    if not all(names):
        raise InputError(f"--outtype {outtype!r}: an empty type in the list")
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated:
        raise InputError(f"--outtype {outtype!r}: {repeated} is given twice")
    return names


def output_paths(outtypes: Sequence[str], out: Path | str, model_dir: Path, folded: bool) -> dict[str, Path]:
    """Where each type goes. `out` with {type} replaced by the type's name; else an existing folder (`out` as
    given ending in a separator must be one) that gets {stem}-{type}.gguf, stem the model folder's name
    (and -seal where scales are folded); else, for one type, `out` itself. Raises InputError for a folder
    that does not exist, or where several types would share one file."""
    given, out = str(out), Path(out)
    if TYPE_FIELD in given:
        return {name: Path(given.replace(TYPE_FIELD, name)) for name in outtypes}
    if given.endswith(("/", os.sep)) and not out.is_dir():
        raise InputError(f"{given}: output folder does not exist")
    if out.is_dir():
        stem = Path(model_dir).resolve().name + ("-seal" if folded else "")
        return {name: out / f"{stem}-{name}.gguf" for name in outtypes}
    if len(outtypes) == 1:
        return {outtypes[0]: out}
    raise InputError(f"{out}: with several --outtype types, -o is an existing folder or a file name with "
                     f"{TYPE_FIELD} in it (e.g. model-seal-{TYPE_FIELD}.gguf)")


def output_plan(outtype: str, imatrix: Path | None,
                tensor_types: TensorTypes | None = None) -> tuple[str, QuantPlan | None]:
    """The outtype's name, and the quantization to run after the converter (None: the converter writes it)."""
    name = outtype.lower()
    if name not in CONVERTER_TYPES and name not in QUANT_TYPES:
        raise InputError(f"unsupported outtype {outtype!r}; choose one of {', '.join(CONVERTER_TYPES)} "
                         f"(written by the converter) or a llama-quantize type: "
                         f"{', '.join(t for t in QUANT_TYPES if t not in CONVERTER_TYPES)}")
    wants_quantizer = imatrix is not None or bool(tensor_types)
    if name in FLOAT_TYPES and wants_quantizer:
        raise InputError(f"--imatrix and per-tensor types (--attn-output-type, --tensor-type, ...) apply to "
                         f"quantized types, not {name}")
    if name in CONVERTER_TYPES and not wants_quantizer:
        return name, None
    return name, check_quant_options(name, imatrix, tensor_types)


def output_plans(outtypes: Sequence[str], imatrix: Path | None,
                 tensor_types: TensorTypes | None = None) -> dict[str, QuantPlan | None]:
    """output_plan of each type, all checked before any work. In a set of several, the importance matrix
    and per-tensor types go to its quantized types; its float types are written without them."""
    if len(outtypes) == 1 or all(name.lower() in FLOAT_TYPES for name in outtypes):
        return dict(output_plan(name, imatrix, tensor_types) for name in outtypes)
    return dict(output_plan(name, None, None) if name.lower() in FLOAT_TYPES else output_plan(name, imatrix, tensor_types)
                for name in outtypes)


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


def stored_attn_output_types(converter_type: str, plan: QuantPlan | None, layout: ModelLayout) -> set[str | None]:
    """The types the attn_output tensors end up stored in, where they can be known before converting:
    the converter's outtype, or F16 where it falls back; the float type the quantizer writes; the type
    asked for them (TensorTypes.asked: the quantizer's own fallbacks are found in the written file by
    check_written_gguf); None: chosen by the quantizer."""
    if plan is None:
        block = CONVERTER_BLOCK.get(converter_type)
        return {"f16" if block and layout.attn_width % block else converter_type}
    if plan.qtype in FLOAT_TYPES:
        return {plan.qtype}
    return {plan.tensor_types.asked(f"blk.{i}.attn_output.weight", plan.qtype, tied=False)
            for i in range(layout.num_layers)}


def f16_storage(converter_type: str, plan: QuantPlan | None, layout: ModelLayout) -> str | None:
    """What stores the folded o_proj weights in float16 on this route (converter_type, then plan), said
    for the user; None: nothing does."""
    if "f16" in stored_attn_output_types(converter_type, plan, layout):
        if (plan.qtype if plan else converter_type) == "f16":
            return "--outtype f16"
        if plan is None:
            return (f"the converter's F16 fallback for attn_output (its rows of {layout.attn_width} are not "
                    f"whole {converter_type.upper()} blocks of {CONVERTER_BLOCK[converter_type]})")
        return "the f16 asked for attn_output (--attn-output-type or --tensor-type)"
    if plan is not None and converter_type == "f16":
        return "the float16 intermediate this float16 checkpoint is quantized from"
    return None


def check_f16_range(model_dir: Path, layout: ModelLayout, scales: SealScales, converter_type: str,
                    plans: Sequence[QuantPlan | None]) -> None:
    """Refuse folds whose o_proj weights would leave float16's range where float16 stores them on any
    route of the run (f16_storage): the converter's f16 (or its F16 fallback for rows that are not whole
    blocks), an f16 intermediate before quantizing, f16 from the quantizer or asked for attn_output."""
    found = next(((plan, where) for plan in plans if (where := f16_storage(converter_type, plan, layout))), None)
    if found is None:
        return
    plan, where = found
    peak = max_folded_abs(model_dir, layout, scales)
    if peak > F16_MAX:
        raise ScalesError(f"folded o_proj weights reach |w| = {peak:.6g}, beyond float16's range "
                          f"({F16_MAX:g}) used by {where}; use --outtype bf16 or f32"
                          + (" from a bfloat16 or float32 checkpoint" if converter_type == "f16" and plan else "")
                          + (", or --attn-output-type bf16 or f32" if plan is None and converter_type != "f16" else ""))


def converter_plan(converter_type: str) -> QuantPlan | None:
    """What the converter is asked for, as check_written_gguf reads it: the attn_output tensors (the
    folded heads) in its block type, where it has one."""
    if converter_type not in CONVERTER_BLOCK:
        return None
    return QuantPlan(converter_type, tensor_types=TensorTypes(((ATTN_OUTPUT_PATTERN, converter_type),)))


def finished_output(path: Path, outtype: str, scales_sha256: str | None) -> bool:
    """Whether `path`, already there, is this run's `outtype` GGUF from an earlier run: outputs are renamed
    into place only once written and checked, so an existing file is complete; its general.file_type and
    seal.scales_sha256 (None: no scales) must say it is that type from these scales."""
    from seal_gguf.constants import GGUFKeys
    from seal_gguf.gguffile.header import read_metadata
    from seal_gguf.gguffile.metadata import file_type_name

    if not path.is_file():
        return False
    try:
        found = read_metadata(path)
    except SealError:
        return False
    file_type = found.get("general.file_type")
    return (file_type_name(file_type if isinstance(file_type, int) else None) == outtype
            and found.get(GGUFKeys.SCALES_SHA256) == scales_sha256)


def convert_to_gguf(model_dir: Path, out_path: Path, outtype: str = "f16", scales: Path | None = None, *,
                    imatrix: Path | None = None, tensor_types: TensorTypes | None = None,
                    llama_cpp: Path | None = None, rope: RopeScaling | None = None, force: bool = False,
                    verbose: bool = False, progress: bool = True,
                    warn: Callable[[str], None] | None = warn_on_stderr, split_max_size: int | None = None) -> Path:
    """Convert an HF model folder to GGUF; with scales, fold them into o_proj during conversion.

    scales=None is the plain baseline through the same converter. rope extends the context: the
    converter reads the extended config.json (seal_gguf.model.rope) and writes the matching GGUF keys,
    checked here before the file is kept. tensor_types: per-tensor types for the quantizer
    (seal_gguf.convert.quantize.parse_tensor_types). The written GGUF is checked for non-finite weights
    before it is kept, and `warn` is told where llama.cpp stores a tensor in another type than asked for,
    of a --tensor-type pattern that matches no tensor, or when the scales were learned on another
    checkpoint and --force folds them anyway. split_max_size (bytes) writes llama.cpp's split parts of
    out_path's name (seal_gguf.gguffile.split.gguf_output).
    Returns the file written (the first part of a split output).
    """
    return convert_to_ggufs(model_dir, {outtype: out_path}, scales, imatrix=imatrix, tensor_types=tensor_types,
                            llama_cpp=llama_cpp, rope=rope, force=force, verbose=verbose, progress=progress,
                            warn=warn, split_max_size=split_max_size)[0]


def convert_to_ggufs(model_dir: Path, outputs: Mapping[str, Path], scales: Path | None = None, *,
                     imatrix: Path | None = None, tensor_types: TensorTypes | None = None,
                     llama_cpp: Path | None = None, rope: RopeScaling | None = None, force: bool = False,
                     verbose: bool = False, progress: bool = True,
                     warn: Callable[[str], None] | None = warn_on_stderr,
                     report: Callable[[str, Path, bool], None] | None = None,
                     split_max_size: int | None = None, resume: bool = False) -> list[Path]:
    """convert_to_gguf for several types at once: outputs maps each type to its file (output_paths).

    One type the converter writes goes straight to its file, as convert_to_gguf does. Otherwise the
    converter runs once, into a lossless intermediate GGUF (lossless_outtype) beside the outputs, and
    llama.cpp's quantizer makes each type from it (the intermediate's own type is the intermediate,
    renamed); `imatrix` and `tensor_types` apply to the quantized types. Every output is written under a
    temporary name and renamed into place once checked, so an error or Ctrl-C leaves the finished ones
    and no partial file. With `resume` (and not `force`), an output already there from an earlier run
    of the same type and scales (finished_output) is kept and skipped: the caller vouches that it was
    made from the same model and options, which the file does not record; `force` makes every output
    again. Any other existing output is refused (OutputExistsError) before any work. `report(type, path, written)` is told of each output as it is
    finished (written=True) or kept (False). split_max_size (bytes): each output is written as llama.cpp's
    split parts of its name (gguf_output); split outputs are never kept from an earlier run. Split parts of an
    output's name already there, of any count, are refused before any work unless `force`; with `force`, once
    an output is complete, what an earlier run left under its name is removed (a set of another count, the
    single file its parts replace). Returns the files written, in the order of `outputs` (for a split output
    its first part).
    """
    from seal_gguf.fold.gguf import add_seal_pairs, fold_record_pairs  # imports gguf
    from seal_gguf.gguffile.split import check_no_parts, gguf_output

    model_dir = Path(model_dir)
    outputs = {name.lower(): Path(path) for name, path in outputs.items()}
    if not outputs:
        raise InputError("no output type given")
    plans = output_plans(list(outputs), imatrix, tensor_types)
    several = len(outputs) > 1
    if len({os.path.abspath(p) for p in outputs.values()}) < len(outputs):
        raise InputError(f"{', '.join(outputs)}: several types would write the same file; put {TYPE_FIELD} in -o")
    config = read_config(model_dir)
    if rope is not None:
        rope = rope.resolved(config, str(model_dir / "config.json"))
        extend_config(config, rope, str(model_dir / "config.json"))  # refused before any long work
    headers = read_headers(model_dir)
    direct = not several and next(iter(plans.values())) is None  # the converter writes the one output
    converter_type = next(iter(plans)) if direct else lossless_outtype(headers)
    # each type's quantization; None: the converter's own file (the output, or the intermediate renamed)
    routes = {name: plan if plan is not None or name == converter_type else QuantPlan(name)
              for name, plan in plans.items()}
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
        check_f16_range(model_dir, layout, sealed, converter_type, list(routes.values()))
    elif config.get("model_type") in supported_model_types():
        # weights that do not fit config.json would convert into a GGUF llama.cpp cannot load
        locate_o_proj(headers, layout_from_config(config, model_dir / "config.json"))
    # a checkpoint folded by `seal-gguf fold`: its GGUF records the fold as fold-and-convert's does, so that
    # inspect, card and validate know it and fold-gguf refuses to fold it again
    record = config.get(CONFIG_FOLD_KEY)
    fold_pairs = (fold_record_pairs(record, layout_from_config(config, model_dir / "config.json"))
                  if scales is None and isinstance(record, dict) else None)
    if resume and split_max_size is not None:
        raise InputError("--resume keeps whole GGUF files; a split set is made again (--force) instead")
    sha256 = sha256_file(scales) if scales is not None and resume and not force else None
    kept = [name for name, path in outputs.items()
            if resume and not force and path.exists() and finished_output(path, name, sha256)]
    todo = {name: path for name, path in outputs.items() if name not in kept}
    for path in todo.values():  # before fetching the converter, which can take a while
        check_output_path(path, force, inputs=[scales, imatrix])
        check_no_parts(path, force)
    written = dict(outputs)
    for name in kept:
        if report is not None:
            report(name, outputs[name], False)
    if todo:
        root = converter_root(llama_cpp, need_seal=scales is not None, progress=progress)
        with extended_model_dir(model_dir, rope) as source, \
                tqdm(total=len(outputs), initial=len(kept), desc="GGUF types", unit="type",
                     disable=not progress or not several) as bar:
            def finished(name: str, files: tuple[Path, ...]) -> None:
                written[name] = files[0]
                bar.update()
                if report is not None:
                    report(name, files[0], True)

            def output(name: str) -> Any:
                return gguf_output(todo[name], split_max_size, force=force, progress=progress, warn=warn)

            if direct:
                name = next(iter(todo))
                with output(name) as out:
                    run_converter(root, source, out.path, converter_type, scales, progress=progress,
                                  verbose=verbose)
                    if fold_pairs is not None:
                        add_seal_pairs(out.path, fold_pairs)
                    if rope is not None:
                        check_gguf_extension(out.path, config, rope)
                    check_written_gguf(out.path, converter_plan(converter_type), folded=scales is not None,
                                       warn=warn)
                finished(name, out.written)
            else:
                order = sorted(todo, key=lambda n: routes[n] is None)  # the intermediate renamed last
                with intermediate_file(todo[order[-1]], converter_type) as mid:
                    run_converter(root, source, mid, converter_type, scales, progress=progress, verbose=verbose)
                    if fold_pairs is not None:
                        add_seal_pairs(mid, fold_pairs)
                    if rope is not None:
                        check_gguf_extension(mid, config, rope)
                    check_written_gguf(mid, None, folded=scales is not None)
                    warn_unmatched_patterns(mid, tensor_types, warn)
                    for name in order:
                        plan = routes[name]
                        with output(name) as out:
                            if plan is None:
                                os.replace(mid, out.path)
                            else:
                                run_quantizer(mid, out.path, plan, progress=progress, verbose=verbose)
                                check_written_gguf(out.path, plan, folded=scales is not None, warn=warn)
                        finished(name, out.written)
    return list(written.values())
