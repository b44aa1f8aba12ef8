"""GGUF quantization with llama.cpp's own quantizer (llama_model_quantize, through llama-cpp-python).

llama.cpp's engines run in a child process: their C code cannot be interrupted from Python
(Ctrl-C must stop them at once), and their log, read as it comes, gives progress and the one
line that says why they failed. `run_engine` does this for the quantizer and the converter.
"""

from __future__ import annotations

import codecs
import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from seal_gguf.constants import GGUFKeys
from seal_gguf.errors import EngineError, InputError, ScalesError
from seal_gguf.fileio import atomic_file, check_output_path, no_room_error, require_file
from seal_gguf.gguffile.header import read_metadata
from seal_gguf.gguffile.metadata import file_type_name

# llama-quantize's type names -> llama_ftype constants of llama-cpp-python
QUANT_TYPES: dict[str, str] = {
    name: "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
    for name in (
        "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
        "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
        "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
        "iq4_nl", "iq4_xs", "tq1_0", "tq2_0",
        "f16", "bf16", "f32",
    )
}
# Types whose main tensors llama.cpp only quantizes with an importance matrix.
NEEDS_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "q2_k_s"})
# Types attn_output can be given (the folded heads live there); ggml type names.
ATTN_OUTPUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0",
                     "iq4_xs", "iq4_nl", "q3_k", "q2_k")
ATTN_OUTPUT_PATTERN = r"attn_output\.weight$"

# "[  12/ 201]   blk.0.attn_q.weight - ..." : one line per tensor in the quantizer's log
QUANTIZER_STEP = re.compile(r"^\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\]")


@dataclass(frozen=True)
class QuantPlan:
    qtype: str
    imatrix: Path | None = None
    attn_output_type: str | None = None


def check_quant_options(qtype: str, imatrix: Path | None, attn_output_type: str | None) -> QuantPlan:
    """Validate a quantization request before any long work starts."""
    name = qtype.lower()
    if name not in QUANT_TYPES:
        raise InputError(f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    if name in NEEDS_IMATRIX and imatrix is None:
        raise InputError(f"{name} needs an importance matrix: pass --imatrix FILE (computed by llama-imatrix)")
    if imatrix is not None:
        imatrix = Path(imatrix).resolve()
        read_imatrix(imatrix)
    if attn_output_type is not None:
        attn_output_type = attn_output_type.lower()
        if attn_output_type not in ATTN_OUTPUT_TYPES:
            raise InputError(f"unknown --attn-output-type {attn_output_type!r}; choose one of "
                             f"{', '.join(ATTN_OUTPUT_TYPES)}")
    return QuantPlan(name, imatrix, attn_output_type)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Per-tensor importance values as llama-quantize computes them from an imatrix file.

    Reads the GGUF format (<tensor>.in_sum2 / <tensor>.counts) and the legacy .dat format.
    """
    path = require_file(Path(path), "importance matrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        data = _read_imatrix_gguf(path) if magic == b"GGUF" else _read_imatrix_legacy(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable importance matrix ({exc})") from None
    if not data:
        raise InputError(f"{path}: the importance matrix holds no entries")
    bad = next((name for name, values in data.items() if not np.isfinite(values).all()), None)
    if bad:
        raise InputError(f"{path}: the importance matrix has non-finite values for {bad}")
    return data


def _read_imatrix_gguf(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in GGUFReader(str(path), "r").tensors}
    data: dict[str, np.ndarray] = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors[base + ".counts"]
        per_expert = sums.reshape(len(counts), -1)
        # an expert never seen gets 1s, as in llama-quantize
        safe = np.where(counts > 0, counts, 1.0)[:, None]
        data[base] = np.where(counts[:, None] > 0, per_expert / safe, 1.0).astype(np.float32).reshape(-1)
    return data


def _read_imatrix_legacy(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1 << 20:
        raise ValueError(f"{n_entries} entries")
    data: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = raw[pos:pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise ValueError(f"truncated entry {name!r}")
        sums = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        data[name] = sums / ncall if ncall > 0 else sums
    return data


def engine_failure(log: str) -> str:
    """The line of an engine's log that says why it failed."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", log) if line.strip()]
    for line in reversed(lines):
        if "failed to quantize:" in line:
            return line.split("failed to quantize:", 1)[1].strip()
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # a Python traceback ends with "SomeError: message"
        for line in reversed(lines):
            match = re.match(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(:.*)?$", line)
            if match:
                return f"{match.group(1)}{match.group(2) or ''}"
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return re.sub(r"^ERROR:[\w.-]*:(Error: )?", "", line)
    return lines[-1] if lines else "no output"


def run_engine(cmd: list[str], *, desc: str, unit: str, step: re.Pattern[str], progress: bool, verbose: bool,
               env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run an engine in a child process; return its exit code and its whole log.

    `step` finds progress in the log: group `done` and, if present, `total` (else 100).
    With verbose, the log is passed through to stderr instead of a progress bar.
    """
    log: list[str] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    try:
        with tqdm(total=100, desc=desc, unit=unit, disable=not progress or verbose, leave=False) as bar:
            pending = ""
            while chunk := proc.stdout.read1(1 << 16):  # type: ignore[attr-defined]
                text = decoder.decode(chunk)
                log.append(text)
                if verbose:
                    sys.stderr.write(text)
                    sys.stderr.flush()
                *lines, pending = re.split(r"[\r\n]", pending + text)
                for line in lines:
                    match = step.search(line)
                    if match:
                        bar.total = int(match.groupdict().get("total") or 100)
                        bar.n = int(match.group("done"))
                        bar.refresh()
        return proc.wait(), "".join(log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def run_quantizer(in_path: Path, out_path: Path, plan: QuantPlan, *, progress: bool = True,
                  verbose: bool = False) -> None:
    """Quantize in_path into out_path (which the caller owns and cleans up)."""
    spec = {"in": str(in_path), "out": str(out_path), "qtype": plan.qtype,
            "imatrix": str(plan.imatrix) if plan.imatrix else None, "attn_output_type": plan.attn_output_type}
    cmd = [sys.executable, "-m", "seal_gguf.convert.quantize", json.dumps(spec)]
    rc, log = run_engine(cmd, desc=f"quantize {plan.qtype}", unit="tensor", step=QUANTIZER_STEP,
                         progress=progress, verbose=verbose)
    if rc != 0:
        full = no_room_error(out_path.parent)  # llama.cpp says "iostream error" for a full disk
        if full is not None:
            raise full
        reason = engine_failure(log)
        if "validation failed" in reason:  # llama.cpp found inf or NaN in what it quantized
            explain_invalid_quantization(in_path)
        hint = "" if verbose else " (run with --verbose for the quantizer's full log)"
        raise EngineError(f"llama.cpp's quantizer failed: {reason}{hint}")


def explain_invalid_quantization(in_path: Path) -> None:
    """llama.cpp refuses a quantization whose data holds inf or NaN ("quantized data validation
    failed"). Where the attn_output weights of the input leave float16's range (folded scales), that
    is the cause: float16 is what llama.cpp falls back to for rows that are not whole blocks of the
    type. Raise ScalesError saying so."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from seal_gguf.constants import F16_MAX

    peak, name = 0.0, ""
    for tensor in GGUFReader(str(in_path), "r").tensors:
        if re.search(ATTN_OUTPUT_PATTERN, tensor.name):
            with np.errstate(all="ignore"):
                value = float(np.abs(dequantize(tensor.data, tensor.tensor_type)).max())
            if value > peak:
                peak, name = value, tensor.name
    if peak > F16_MAX:
        raise ScalesError(f"{name} holds weights up to |w| = {peak:.6g}, beyond float16's range ({F16_MAX:g}), "
                          "which llama.cpp stores attn_output in where its rows are not whole blocks of the type; "
                          "it refused the result (non-finite weights). Use "
                          "--attn-output-type bf16 or f32, or --outtype bf16 or f32")


def warn_on_stderr(message: str) -> None:
    """The default way a library step says something the user must know but that is no error."""
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def _non_finite(data: np.ndarray, qtype: Any) -> int:
    """How many stored values of a tensor are inf or NaN (quantized types: after dequantizing)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return int(data.size - np.count_nonzero(np.isfinite(data)))
    if qtype == GGMLQuantizationType.BF16:  # exponent bits all ones
        return int(np.count_nonzero((np.ascontiguousarray(data).view(np.uint16) & 0x7F80) == 0x7F80))
    with np.errstate(all="ignore"):  # an inf block scale times 0 is NaN: counted, not warned about
        return int(np.count_nonzero(~np.isfinite(dequantize(data, qtype))))


def check_written_gguf(path: Path, expected_attn_output: str | None = None, folded: bool = False,
                       warn: Callable[[str], None] | None = None) -> None:
    """Check a GGUF just written, before it is kept: no inf or NaN in any float tensor or in any
    attn_output tensor (the folded heads: dequantized whatever their type; a quantized block's fp16
    scale can overflow too), and each attn_output stored as `expected_attn_output` (a ggml type name,
    e.g. "q4_k") where one was asked for: llama.cpp silently falls back to another type for rows that
    are not whole blocks of it, which `warn` is told. A folded GGUF must carry the scales' seal.* keys."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, OSError, struct.error) as exc:
        raise EngineError(f"{path}: the GGUF just written cannot be read back ({exc})") from None
    if folded and GGUFKeys.SCALES_SHA256 not in reader.fields:  # the patch folded an instance that wrote nothing
        raise EngineError(f"{path}: llama.cpp's converter wrote no {GGUFKeys.SCALES_SHA256}, so its --seal-scales "
                          "patch folded nothing in this model's GGUF; report it with the model's config.json")
    floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    fallbacks: dict[str, list[str]] = {}
    for tensor in reader.tensors:
        attn_output = re.search(ATTN_OUTPUT_PATTERN, tensor.name) is not None
        qtype = tensor.tensor_type
        if attn_output and expected_attn_output and qtype.name.lower() != expected_attn_output.lower():
            fallbacks.setdefault(qtype.name, []).append(tensor.name)
        if qtype not in floats and not attn_output:
            continue
        bad = _non_finite(tensor.data, qtype)
        if bad:
            row = int(tensor.shape[0])
            why = ""
            if expected_attn_output and qtype.name.lower() != expected_attn_output.lower():
                block = GGML_QUANT_SIZES[GGMLQuantizationType[expected_attn_output.upper()]][0]
                why = (f" (llama.cpp stored it as {qtype.name}, not {expected_attn_output.upper()}: rows of {row} "
                       f"are not whole blocks of {block})")
            what = f"{path.name}: {tensor.name} holds {bad} non-finite weights{why}"
            if folded and attn_output:
                raise ScalesError(f"{what}: the folded weights leave the range of its type's float16 values; "
                                  "use --outtype bf16 or f32, or --attn-output-type bf16 or f32")
            raise InputError(f"{what}; the model's own weights leave the range of {qtype.name}: use --outtype "
                             "bf16 or f32")
    if warn is not None:
        for qtype_name, names in fallbacks.items():
            row = next(int(t.shape[0]) for t in reader.tensors if t.name == names[0])
            block = GGML_QUANT_SIZES[GGMLQuantizationType[expected_attn_output.upper()]][0]  # type: ignore[union-attr]
            warn(f"llama.cpp stored {len(names)} attn_output tensor(s) ({names[0]}{', ...' if len(names) > 1 else ''}) "
                 f"as {qtype_name}, not the {expected_attn_output.upper()} asked for: their rows of {row} are "  # type: ignore[union-attr]
                 f"not whole {expected_attn_output.upper()} blocks of {block}")  # type: ignore[union-attr]


# The GGUF types llama.cpp's quantizer takes as input (gguf-py's LlamaFileType names, lower case).
QUANTIZABLE_FROM = ("f32", "f16", "bf16")


def quantize(in_path: Path, out_path: Path, qtype: str, *, imatrix: Path | None = None,
             attn_output_type: str | None = None, force: bool = False, progress: bool = True,
             verbose: bool = False, warn: Callable[[str], None] | None = warn_on_stderr) -> Path:
    """Quantize a GGUF file (f32, f16 or bf16) with llama.cpp's quantizer; seal.* keys are kept.

    The result is checked before it is kept (check_written_gguf): no non-finite weights, and `warn` is
    told when llama.cpp gave attn_output another type than --attn-output-type."""
    in_path, out_path = Path(in_path), Path(out_path)
    plan = check_quant_options(qtype, imatrix, attn_output_type)
    require_file(in_path, "GGUF file")
    with open(in_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{in_path}: not a GGUF file (bad magic)")
    file_type = file_type_name(read_metadata(in_path).get("general.file_type"))  # a truncated file fails here
    if file_type not in QUANTIZABLE_FROM + ("unknown",):
        raise InputError(f"{in_path}: a {file_type} GGUF; llama.cpp's quantizer starts from f32, f16 or bf16 "
                         "(requantizing loses quality): convert the model again with --outtype f16, bf16 or f32")
    check_output_path(out_path, force, inputs=[in_path, imatrix])
    with atomic_file(out_path, force=force) as tmp:
        try:
            run_quantizer(in_path.resolve(), tmp, plan, progress=progress, verbose=verbose)
        except EngineError as exc:  # the quantizer's reason rarely names the file it read
            raise EngineError(f"{in_path}: {exc}") from None
        check_written_gguf(tmp, plan.attn_output_type, folded=_has_seal_keys(in_path), warn=warn)
    return out_path


def _has_seal_keys(path: Path) -> bool:
    from seal_gguf.constants import GGUFKeys

    return GGUFKeys.SCALES_SHA256 in read_metadata(path)


def _quantize_here(spec: dict[str, Any]) -> int:
    """The child process: one llama_model_quantize call; llama.cpp logs to stderr."""
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[spec["qtype"]])
    if spec["imatrix"]:
        entries = read_imatrix(Path(spec["imatrix"]))
        arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in entries.values()]  # alive until the call
        table = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()  # ends with a null name
        for i, name in enumerate(entries):
            table[i].name = name.encode()
            table[i].data = arrays[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            table[i].size = arrays[i].size
        params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if spec["attn_output_type"]:
        overrides = (llama_cpp.llama_model_tensor_override * 2)()  # ends with a null pattern
        overrides[0].pattern = ATTN_OUTPUT_PATTERN.encode()
        overrides[0].type = getattr(llama_cpp, f"GGML_TYPE_{spec['attn_output_type'].upper()}")
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return int(llama_cpp.llama_model_quantize(spec["in"].encode(), spec["out"].encode(), ctypes.byref(params)))


if __name__ == "__main__":
    sys.exit(_quantize_here(json.loads(sys.argv[1])))
