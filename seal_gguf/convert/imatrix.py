"""An importance matrix made from the SEAL model, in the GGUF format llama.cpp's quantizer reads.

llama-imatrix records, for every matrix multiplication whose weight is a `blk.*` tensor, the sum
over calibration tokens of each input channel's squared activation (`<tensor>.in_sum2`) and the
number of tokens (`<tensor>.counts`); llama-quantize weighs each weight column's rounding error by
in_sum2 / counts (tools/imatrix/imatrix.cpp, src/llama-quant.cpp of the pinned llama.cpp). Here
the same sums come from the model in PyTorch with the SEAL scales attached by hooks: SEAL changes
the inputs of every later layer, while attn_output's input stays the heads' unscaled outputs (the
fold multiplies W_o's columns, not its input), so that input is taken before the scales act.

Pieces: ImatrixData (the pure accumulation), gguf_weight_names (HF Linear -> GGUF tensor name,
gguf-py's TensorNameMap as the converter uses it), calibration_chunks (the text), collect_imatrix
(the model run), write_imatrix (the file) and make_imatrix (all of it, as `seal-gguf imatrix`).

Calibration: general text (the trainer's anchor text, or the user's --text) and generated line
retrieval prompts of the "train" split at the target length. The measurement text
(measure/generaltext) is left out: the general cost of every GGUF is measured on it, and a matrix
fitted to it would flatter that figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from seal_gguf.constants import ScalesMeta
from seal_gguf.errors import ArchitectureError, InputError
from seal_gguf.fileio import atomic_file, check_output_path
from seal_gguf.model.architectures import ModelLayout, model_layout
from seal_gguf.model.hooks import attach_scales, o_proj_modules
from seal_gguf.texts import Chunk, Document, make_chunks, special_prefix

# The GGUF imatrix format (common/imatrix-loader.h, tools/imatrix/imatrix.cpp of the pinned llama.cpp)
IMATRIX_TYPE = "imatrix"  # general.type
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"

DEFAULT_LENGTH = 1024  # tokens per chunk when the scales record no training length
DEFAULT_CHUNKS = 16
RETRIEVAL_TASK = "lines"
# The converter drops this prefix of multimodal checkpoints' text model before mapping names.
TEXT_MODEL_PREFIX = "language_model."


@dataclass
class ImatrixData:
    """Per weight, by its GGUF tensor name: Σ over tokens of each input channel's squared activation
    ([in_features], float64) and the number of tokens; the run's chunk count, chunk size (tokens) and
    datasets, as llama-imatrix records them."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add the inputs x ([..., in_features], any dtype or device) of weight `name`: every row is a token."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        step = rows.pow(2).sum(dim=0).cpu().double().numpy()
        if name in self.sums:
            if self.sums[name].shape != step.shape:
                raise InputError(f"{name}: inputs of width {step.shape[0]}, earlier {self.sums[name].shape[0]}")
            self.sums[name] += step
        else:
            self.sums[name] = step
        self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

    def check_finite(self) -> None:
        """Raise InputError naming the first weight whose sums hold inf or NaN (llama-imatrix stops there too)."""
        for name, sums in self.sums.items():
            if not np.isfinite(sums).all() or not np.isfinite(sums.astype(np.float32)).all():
                raise InputError(f"the model's inputs to {name} hold inf or NaN (or overflow float32); "
                                 "run it in float32 (--dtype float32)")


# -- names --

def gguf_architecture(layout: ModelLayout) -> Any:
    """gguf-py's MODEL_ARCH of the GGUF llama.cpp's converter writes for this model."""
    import gguf

    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    for name in layout.gguf_architectures:
        if name in by_name:
            return by_name[name]
    raise ArchitectureError(f"{layout.model_type}: gguf-py knows none of the GGUF architectures "
                            f"{', '.join(layout.gguf_architectures) or '(none)'}; upgrade the gguf package")


def gguf_weight_names(model: nn.Module, layout: ModelLayout) -> dict[str, str]:
    """HF module path -> GGUF tensor name (e.g. "model.layers.3.mlp.down_proj" -> "blk.3.ffn_down.weight")
    for every Linear of the decoder layers, mapped by gguf-py's TensorNameMap as llama.cpp's converter
    maps them. The experts of mixture-of-experts layers are no Linear (3-D weights) and are not listed.
    Raises ArchitectureError for a Linear that has no GGUF name."""
    import gguf

    names = gguf.get_tensor_name_map(gguf_architecture(layout), layout.num_layers)
    prefix = layout.layers_prefix + "."
    out: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module_name.startswith(prefix):
            continue
        candidates = (module_name, module_name.replace(TEXT_MODEL_PREFIX, ""))
        mapped = next((n for n in (names.get_name(c + ".weight", try_suffixes=(".weight",)) for c in candidates)
                       if n is not None), None)
        if mapped is None:
            raise ArchitectureError(f"{module_name}: no GGUF tensor name for this Linear in gguf-py's "
                                    f"{layout.gguf_architectures[0]} mapping")
        out[module_name] = mapped
    if not out:
        raise ArchitectureError(f"{layout.model_type}: no Linear under {layout.layers_prefix}")
    return out


def expert_weights(model: nn.Module, layout: ModelLayout) -> list[str]:
    """The 3-D weights (mixture-of-experts experts) of the decoder layers: gguf_weight_names leaves them out."""
    prefix = layout.layers_prefix + "."
    return [name for name, p in model.named_parameters() if name.startswith(prefix) and p.dim() == 3]


# -- text --

def calibration_chunks(tokenizer: Any, documents: Sequence[Document], length: int, n_chunks: int,
                       seed: int) -> list[Chunk]:
    """n_chunks token chunks: up to half (rounded up) general text, `documents` cut into chunks of at most
    `length` tokens (BOS first, if the tokenizer has one) and picked evenly across them; the rest generated
    line-retrieval prompts with their answers ("train" split, `seed`), each `length` prompt tokens.
    Raises InputError for a length or count that is too small, or text that gives no chunk."""
    from seal_gguf.tasks import make_cases

    if length < 16:
        raise InputError(f"the chunk length must be at least 16 tokens (got {length})")
    if n_chunks < 1:
        raise InputError(f"at least one chunk is needed (got {n_chunks})")
    ids = [(d.name, list(tokenizer(d.text, add_special_tokens=False)["input_ids"])) for d in documents]
    general = make_chunks(ids, special_prefix(tokenizer), length)
    if documents and not general:
        raise InputError(f"the calibration text ({', '.join(d.name for d in documents)}) is empty after tokenization")
    n_general = min(len(general), n_chunks - n_chunks // 2)
    picked = [general[int(i)] for i in np.linspace(0, len(general) - 1, n_general).round()] if n_general else []
    cases = make_cases(tokenizer, RETRIEVAL_TASK, length, n_chunks - n_general, seed, split="train")
    retrieval = [Chunk(f"{RETRIEVAL_TASK}-{length}",
                       list(tokenizer(c.prompt + c.answer, add_special_tokens=False)["input_ids"])) for c in cases]
    return picked + retrieval


# -- the model run --

def collect_imatrix(model: nn.Module, layout: ModelLayout, chunks: Sequence[Chunk], scales: torch.Tensor | None,
                    progress: bool = True) -> ImatrixData:
    """Run `model` (as load_model returns it) on each chunk, with `scales` ([L, H] or [L, H, D]) attached
    when given, and sum the squared inputs of every decoder-layer Linear under its GGUF name.

    The input of o_proj (attn_output) is taken before the scales act on it: folding multiplies that
    weight's columns, the folded model's attn_output sees the unscaled head outputs. chunk_size is the
    longest chunk. Raises InputError if an input holds inf or NaN, ArchitectureError for a Linear with no
    GGUF name."""
    names = gguf_weight_names(model, layout)
    data = ImatrixData(chunk_size=max(len(c.ids) for c in chunks),
                       datasets=list(dict.fromkeys(c.document for c in chunks)))
    device = next(model.parameters()).device

    def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        return lambda _module, args: data.add(name, args[0])

    # prepended, so that o_proj's collector runs before the scales' own pre-hook
    handles = [model.get_submodule(module).register_forward_pre_hook(hook_for(name), prepend=True)
               for module, name in names.items()]
    was_training = model.training
    model.eval()
    try:
        with (attach_scales(model, layout, scales) if scales is not None else nullcontext()), torch.no_grad(), \
                tqdm(chunks, desc="imatrix", unit="chunk", disable=not progress, dynamic_ncols=True) as bar:
            for chunk in bar:
                model(input_ids=torch.tensor([chunk.ids], device=device))
                data.chunk_count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    data.check_finite()
    return data


# -- the file --

def write_imatrix(path: Path, data: ImatrixData, architecture: str, force: bool = False) -> Path:
    """Write `data` as a GGUF imatrix file at `path`, atomically: general.type "imatrix", imatrix.datasets,
    imatrix.chunk_count, imatrix.chunk_size, and per weight `<name>.in_sum2` (float32, ggml shape
    [in_features, 1]) and `<name>.counts` (float32, [1, 1]), names sorted, as llama-imatrix writes them
    (plus general.architecture, which gguf-py's writer always adds). Raises OutputExistsError for an
    existing path without force, InputError for an empty matrix."""
    import gguf

    if not data.sums:
        raise InputError("the importance matrix holds no entries")
    with atomic_file(Path(path), force=force) as tmp:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        writer.add_type(IMATRIX_TYPE)
        writer.add_array(KEY_DATASETS, list(data.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, data.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, data.chunk_size)
        for name in sorted(data.sums):
            writer.add_tensor(name + SUMS_SUFFIX, data.sums[name].astype(np.float32).reshape(1, -1))
            writer.add_tensor(name + COUNTS_SUFFIX, np.array([[data.counts[name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


# -- all of it --

def chunk_budget(length: int, chunks: int | None, tokens: int | None) -> int:
    """The number of chunks: `chunks`, or enough chunks of `length` tokens for `tokens`, or DEFAULT_CHUNKS."""
    if chunks is not None and tokens is not None:
        raise InputError("give --chunks or --tokens, not both")
    if tokens is not None:
        if tokens < 1:
            raise InputError(f"--tokens must be at least 1 (got {tokens})")
        return math.ceil(tokens / length)
    return DEFAULT_CHUNKS if chunks is None else chunks


def make_imatrix(model_dir: Path, scales_path: Path | None, out_path: Path, documents: Sequence[Document], *,
                 length: int | None = None, chunks: int | None = None, tokens: int | None = None, seed: int = 0,
                 device: str = "auto", dtype: str = "float32", progress: bool = True, force: bool = False,
                 warn: Callable[[str], None] | None = None) -> tuple[Path, ImatrixData]:
    """`seal-gguf imatrix`: the importance matrix of the model in model_dir with the scales of scales_path
    (None: the model as it is; a checkpoint with scales folded in gives the SEAL matrix that way), written
    to out_path. documents: the general calibration text (the CLI's default: the built-in anchor text,
    seal_gguf.learn.anchor.anchor_documents; never the measurement text). length:
    tokens per chunk (default: the scales' training length, else DEFAULT_LENGTH). chunks / tokens: the
    budget (see chunk_budget). Raises InputError, ScalesError, ArchitectureError, OutputExistsError with
    one line; nothing is written on failure."""
    import gguf

    from seal_gguf.model.checkpoint import check_base_fingerprint
    from seal_gguf.model.loading import load_model, load_tokenizer, resolve_device
    from seal_gguf.scales import load_scales

    out_path = Path(out_path)
    check_output_path(out_path, force, inputs=[scales_path])
    scales = None if scales_path is None else load_scales(Path(scales_path), model_layout(Path(model_dir)))
    if length is None and scales is not None and scales.metadata.get(ScalesMeta.LENGTH, "").isdigit():
        length = int(scales.metadata[ScalesMeta.LENGTH])
    length = DEFAULT_LENGTH if length is None else length
    n_chunks = chunk_budget(length, chunks, tokens)
    tokenizer = load_tokenizer(Path(model_dir))
    plan = calibration_chunks(tokenizer, documents, length, n_chunks, seed)
    model, layout = load_model(Path(model_dir), resolve_device(device), dtype, progress=progress,
                               folded_ok=scales is None)
    if scales is not None:
        mismatch = check_base_fingerprint(scales.metadata.get(ScalesMeta.BASE_FINGERPRINT),
                                          o_proj_modules(model, layout)[0].weight, scales_path, model_dir,
                                          force=False, certain=False)
        if mismatch and warn is not None:
            warn(mismatch)
    experts = expert_weights(model, layout)
    if experts and warn is not None:
        warn(f"{len(experts)} expert weights ({experts[0]}, ...) get no entry: llama.cpp quantizes them without "
             "a matrix, and refuses the types that need one (iq1_s .. iq3_xxs, q2_k_s) for them")
    data = collect_imatrix(model, layout, plan, None if scales is None else scales.values, progress)
    architecture = gguf.MODEL_ARCH_NAMES[gguf_architecture(layout)]
    return write_imatrix(out_path, data, architecture, force=force), data
