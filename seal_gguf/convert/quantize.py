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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from seal_gguf.constants import GGUFKeys
from seal_gguf.errors import EngineError, InputError, ScalesError
from seal_gguf.fileio import check_output_path, no_room_error, require_file
from seal_gguf.gguffile.header import read_metadata
from seal_gguf.gguffile.metadata import file_type_name
from seal_gguf.gguffile.split import read_gguf_parts

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
# Types a tensor can be given (--tensor-type, --attn-output-type, --output-tensor-type,
# --token-embedding-type); ggml type names, as llama-quantize takes them.
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0",
                "iq4_xs", "iq4_nl", "q3_k", "iq3_s", "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
# Tensor types llama.cpp only writes with an importance matrix (llama-quant.cpp: tensor_requires_imatrix).
TENSOR_TYPES_NEED_IMATRIX = frozenset({"iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"})
# The ggml type of a llama-quantize type's tensors where no mixture rule picks another
# (llama-quant.cpp: llama_ftype_get_default_type); the others are their own.
DEFAULT_TENSOR_TYPE = {"q2_k_s": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k",
                       "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "iq2_s": "iq2_xs", "iq2_m": "iq2_s",
                       "iq3_xs": "iq3_s", "iq3_m": "iq3_s"}
FLOAT_TYPES = ("f32", "f16", "bf16")
ATTN_OUTPUT_PATTERN = r"attn_output\.weight$"
TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")  # llama-quant.cpp: tensor_name_match_token_embd
OUTPUT_NAME = "output.weight"
# Regex syntax Python's re takes but llama.cpp's std::regex (ECMAScript) does not: (?P<name>...), (?<=...),
# (?<!...), inline flags (?i) and comments (?#...); ECMAScript's own groups are (?:...), (?=...), (?!...).
NOT_ECMASCRIPT = re.compile(r"\(\?(?![:=!])")

# "[  12/ 201]   blk.0.attn_q.weight - ..." : one line per tensor in the quantizer's log
QUANTIZER_STEP = re.compile(r"^\[\s*(?P<done>\d+)/\s*(?P<total>\d+)\]")


@dataclass(frozen=True)
class TensorTypes:
    """The types llama.cpp's quantizer is asked to give chosen tensors, as llama-quantize's options say
    (its llama_model_quantize_params): `overrides` are (regex, ggml type) pairs in order, and the first
    pattern found in a tensor's name gives its type (--tensor-type; --attn-output-type is the pattern
    ATTN_OUTPUT_PATTERN, put first); `pure` quantizes every tensor to the type's default ggml type
    instead of its mixture. Built and checked by parse_tensor_types."""

    overrides: tuple[tuple[str, str], ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False

    def __bool__(self) -> bool:
        return bool(self.overrides or self.output_tensor_type or self.token_embedding_type or self.pure)

    def asked(self, name: str, qtype: str, tied: bool) -> str | None:
        """The ggml type asked for the 2-D or 3-D tensor `name` of a `qtype` quantization, in
        llama-quant.cpp's order (llama_tensor_get_type); None: left to llama.cpp's mixture. `tied`: the
        model has no output.weight, so llama.cpp gives token_embd the output tensor's type."""
        patterns = [ggml_type for pattern, ggml_type in self.overrides if re.search(pattern, name)]
        if self.token_embedding_type and name in TOKEN_EMBD_NAMES and not (name != TOKEN_EMBD_NAMES[0] and patterns):
            return self.token_embedding_type
        if self.output_tensor_type and name == OUTPUT_NAME:
            return self.output_tensor_type
        if patterns:
            return patterns[0]
        if self.pure:
            return DEFAULT_TENSOR_TYPE.get(qtype, qtype)
        if self.output_tensor_type and tied and name in TOKEN_EMBD_NAMES:
            return self.output_tensor_type
        return None


def _tensor_type(value: str, option: str) -> str:
    name = value.strip().lower()
    if name not in TENSOR_TYPES:
        raise InputError(f"{option}: unknown tensor type {value.strip()!r}; choose one of {', '.join(TENSOR_TYPES)}")
    return name


def parse_tensor_types(tensor_type: Sequence[str] = (), *, attn_output_type: str | None = None,
                       output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                       pure: bool = False) -> TensorTypes:
    """TensorTypes from llama-quantize's options: each --tensor-type is PATTERN=TYPE, PATTERN a regular
    expression searched in the GGUF tensor names (lower-cased, as llama-quantize does; llama.cpp runs it
    with std::regex, so Python-only syntax is refused), TYPE a ggml type of TENSOR_TYPES.
    Raises InputError, naming the option, for a malformed pair, a bad pattern or an unknown type."""
    overrides: list[tuple[str, str]] = []
    if attn_output_type is not None:
        overrides.append((ATTN_OUTPUT_PATTERN, _tensor_type(attn_output_type, "--attn-output-type")))
    for given in tensor_type:
        pattern, sep, type_name = given.rpartition("=")
        if not sep or not pattern.strip() or not type_name.strip():
            raise InputError(f"--tensor-type {given!r}: expected PATTERN=TYPE, e.g. attn_v=q8_0 or 'blk\\.[0-3]\\.ffn_down=q6_k'")
        pattern = pattern.strip().lower()
        if NOT_ECMASCRIPT.search(pattern):
            raise InputError(f"--tensor-type {given!r}: llama.cpp's regular expressions (ECMAScript) have no "
                             "(?P<..>), (?<..), (?i) or (?#..) groups")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"--tensor-type {given!r}: not a regular expression ({exc})") from None
        overrides.append((pattern, _tensor_type(type_name, f"--tensor-type {given!r}")))
    return TensorTypes(
        tuple(overrides),
        None if output_tensor_type is None else _tensor_type(output_tensor_type, "--output-tensor-type"),
        None if token_embedding_type is None else _tensor_type(token_embedding_type, "--token-embedding-type"),
        pure)


@dataclass(frozen=True)
class QuantPlan:
    qtype: str
    imatrix: Path | None = None
    tensor_types: TensorTypes = TensorTypes()


def check_quant_options(qtype: str, imatrix: Path | None, tensor_types: TensorTypes | None = None) -> QuantPlan:
    """Validate a quantization request before any long work starts: the type, the importance matrix
    (read; required by the types and tensor types that llama.cpp only makes with one)."""
    name = qtype.lower()
    tensor_types = tensor_types or TensorTypes()
    if name not in QUANT_TYPES:
        raise InputError(f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    if name in NEEDS_IMATRIX and imatrix is None:
        raise InputError(f"{name} needs an importance matrix: pass --imatrix FILE (computed by llama-imatrix)")
    needy = next((t for _, t in tensor_types.overrides if t in TENSOR_TYPES_NEED_IMATRIX), None)
    if needy is not None and imatrix is None:
        raise InputError(f"tensor type {needy} needs an importance matrix: pass --imatrix FILE "
                         "(computed by llama-imatrix)")
    if imatrix is not None:
        imatrix = Path(imatrix).resolve()
        read_imatrix(imatrix)
    return QuantPlan(name, imatrix, tensor_types)


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
    types = plan.tensor_types
    spec = {"in": str(in_path), "out": str(out_path), "qtype": plan.qtype,
            "imatrix": str(plan.imatrix) if plan.imatrix else None, "overrides": types.overrides,
            "output_tensor_type": types.output_tensor_type, "token_embedding_type": types.token_embedding_type,
            "pure": types.pure}
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


def check_written_gguf(path: Path, plan: QuantPlan | None = None, folded: bool = False,
                       warn: Callable[[str], None] | None = None) -> None:
    """Check a GGUF just written, before it is kept: no inf or NaN in any float tensor or in any
    attn_output tensor (the folded heads: dequantized whatever their type; a quantized block's fp16
    scale can overflow too), and each tensor stored in the type `plan` asked for it (TensorTypes.asked):
    llama.cpp silently falls back to another type for rows that are not whole blocks of it, which
    `warn` is told, one line per asked and stored type. A folded GGUF must carry the scales' seal.* keys."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, OSError, struct.error) as exc:
        raise EngineError(f"{path}: the GGUF just written cannot be read back ({exc})") from None
    if folded and GGUFKeys.SCALES_SHA256 not in reader.fields:  # the patch folded an instance that wrote nothing
        raise EngineError(f"{path}: llama.cpp's converter wrote no {GGUFKeys.SCALES_SHA256}, so its --seal-scales "
                          "patch folded nothing in this model's GGUF; report it with the model's config.json")
    floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    tied = not any(t.name == OUTPUT_NAME for t in reader.tensors)
    fallbacks: dict[tuple[str, str], list[Any]] = {}  # (asked, stored) -> tensors
    for tensor in reader.tensors:
        attn_output = re.search(ATTN_OUTPUT_PATTERN, tensor.name) is not None
        qtype = tensor.tensor_type
        asked = plan.tensor_types.asked(tensor.name, plan.qtype, tied) if plan and len(tensor.shape) >= 2 else None
        if asked and qtype.name.lower() != asked:
            fallbacks.setdefault((asked, qtype.name), []).append(tensor)
        if qtype not in floats and not attn_output:
            continue
        bad = _non_finite(tensor.data, qtype)
        if bad:
            row = int(tensor.shape[0])
            why = ""
            if asked and qtype.name.lower() != asked:
                block = GGML_QUANT_SIZES[GGMLQuantizationType[asked.upper()]][0]
                why = (f" (llama.cpp stored it as {qtype.name}, not {asked.upper()}: rows of {row} "
                       f"are not whole blocks of {block})")
            what = f"{path.name}: {tensor.name} holds {bad} non-finite weights{why}"
            if folded and attn_output:
                raise ScalesError(f"{what}: the folded weights leave the range of its type's float16 values; "
                                  "use --outtype bf16 or f32, or --attn-output-type bf16 or f32")
            raise InputError(f"{what}; the model's own weights leave the range of {qtype.name}: use --outtype "
                             "bf16 or f32")
    if warn is not None:
        for (asked, stored), tensors in fallbacks.items():
            names = f"{tensors[0].name}{', ...' if len(tensors) > 1 else ''}"
            row = int(tensors[0].shape[0])
            block = GGML_QUANT_SIZES[GGMLQuantizationType[asked.upper()]][0]
            why = (f"their rows of {row} are not whole {asked.upper()} blocks of {block}" if row % block
                   else "llama.cpp does not quantize them")
            warn(f"llama.cpp stored {len(tensors)} tensor(s) ({names}) as {stored}, not the {asked.upper()} "
                 f"asked for: {why}")


# The GGUF types llama.cpp's quantizer takes as input (gguf-py's LlamaFileType names, lower case).
QUANTIZABLE_FROM = ("f32", "f16", "bf16")


def quantize(in_path: Path, out_path: Path, qtype: str, *, imatrix: Path | None = None,
             tensor_types: TensorTypes | None = None, force: bool = False, progress: bool = True,
             verbose: bool = False, warn: Callable[[str], None] | None = warn_on_stderr,
             split_max_size: int | None = None) -> Path:
    """Quantize a GGUF file (f32, f16 or bf16) with llama.cpp's quantizer; seal.* keys are kept.

    tensor_types: per-tensor types (parse_tensor_types). split_max_size (bytes): write llama.cpp's split
    parts of out_path's name (seal_gguf.gguffile.split). The result is checked before it is kept
    (check_written_gguf): no non-finite weights, and `warn` is told where llama.cpp stored a tensor in
    another type than asked, and of a --tensor-type pattern that matches no tensor (warn_unmatched_patterns).
    Returns the file written (the first part of a split output)."""
    in_path, out_path = Path(in_path), Path(out_path)
    plan = check_quant_options(qtype, imatrix, tensor_types)
    if plan.tensor_types and plan.qtype in FLOAT_TYPES:
        raise InputError(f"per-tensor types apply to quantized types, not {plan.qtype}")
    require_file(in_path, "GGUF file")
    with open(in_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{in_path}: not a GGUF file (bad magic)")
    # a truncated file fails here; a split GGUF: every part there, from one split (llama.cpp's errors are vaguer)
    file_type_entry = read_gguf_parts(in_path)[0].header.kv.get("general.file_type")
    file_type = file_type_name(file_type_entry.value if file_type_entry is not None else None)
    if file_type not in QUANTIZABLE_FROM + ("unknown",):
        raise InputError(f"{in_path}: a {file_type} GGUF; llama.cpp's quantizer starts from f32, f16 or bf16 "
                         "(requantizing loses quality): convert the model again with --outtype f16, bf16 or f32")
    from seal_gguf.gguffile.split import gguf_output  # imports gguf

    check_output_path(out_path, force, inputs=[in_path, imatrix])
    with gguf_output(out_path, split_max_size, force=force, progress=progress, warn=warn, inputs=[in_path]) as out:
        warn_unmatched_patterns(in_path, plan.tensor_types, warn)
        try:
            run_quantizer(in_path.resolve(), out.path, plan, progress=progress, verbose=verbose)
        except EngineError as exc:  # the quantizer's reason rarely names the file it read
            raise EngineError(f"{in_path}: {exc}") from None
        check_written_gguf(out.path, plan, folded=_has_seal_keys(in_path), warn=warn)
    return out.written[0]


def warn_unmatched_patterns(path: Path, tensor_types: TensorTypes | None,
                            warn: Callable[[str], None] | None) -> None:
    """Tell `warn` of each per-tensor pattern that matches none of the tensors llama.cpp's quantizer would
    quantize in the GGUF at path (2-D and larger, in every part): llama-quantize applies such a pattern to
    nothing and says nothing, so a misspelt one would go unnoticed."""
    if warn is None or tensor_types is None or not tensor_types.overrides:
        return
    from seal_gguf.gguffile.split import read_gguf_parts  # imports gguf

    names = [name for part in read_gguf_parts(path) for name, info in part.header.tensors.items()
             if len(info.dims) >= 2]
    for pattern, type_name in tensor_types.overrides:
        if not any(re.search(pattern, name) for name in names):
            warn(f"--tensor-type '{pattern}={type_name}' matches none of the model's {len(names)} tensors that "
                 "llama.cpp quantizes: it changes nothing (the GGUF names them like blk.0.attn_v.weight)")


def _has_seal_keys(path: Path) -> bool:
    from seal_gguf.constants import GGUFKeys

    return GGUFKeys.SCALES_SHA256 in read_metadata(path)


def _ggml_type(name: str) -> int:
    """A ggml type name's enum value (gguf-py mirrors ggml's enum; llama-cpp-python lacks some, e.g. BF16)."""
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name.upper()])


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
    if spec["overrides"]:
        given = spec["overrides"]
        overrides = (llama_cpp.llama_model_tensor_override * (len(given) + 1))()  # ends with a null pattern
        for i, (pattern, type_name) in enumerate(given):
            overrides[i].pattern = pattern.encode()  # the array holds on to the bytes
            overrides[i].type = _ggml_type(type_name)
        overrides[len(given)].type = llama_cpp.GGML_TYPE_COUNT
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if spec["output_tensor_type"]:
        params.output_tensor_type = _ggml_type(spec["output_tensor_type"])
    if spec["token_embedding_type"]:
        params.token_embedding_type = _ggml_type(spec["token_embedding_type"])
    params.pure = bool(spec["pure"])
    return int(llama_cpp.llama_model_quantize(spec["in"].encode(), spec["out"].encode(), ctypes.byref(params)))


if __name__ == "__main__":
    sys.exit(_quantize_here(json.loads(sys.argv[1])))
