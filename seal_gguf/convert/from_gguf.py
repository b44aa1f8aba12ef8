"""A GGUF (any type transformers can read) becomes a plain HF checkpoint, dequantized.

An import is only written when it is the GGUF's model:
- a split GGUF, given by its first part, is read whole (its parts merged into a temporary GGUF beside
  the output: transformers reads one file); a missing part, or parts of different splits, are refused;
- config values that transformers' GGUF mapping leaves at its defaults are derived from the GGUF the
  way llama.cpp derives them (derive_config): head_dim from the key length, Gemma 3's attention scale;
- transformers must find every weight of the model in the GGUF, and no other (missing weights would
  be initialised at random);
- the imported model in PyTorch and the GGUF in llama.cpp must give the same next-token
  distributions on a short token sequence, within what the GGUF's type and the chosen dtype cost
  (check_import); otherwise nothing is written.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from seal_gguf.constants import CONFIG_FOLD_KEY, GGUFKeys
from seal_gguf.errors import InputError, SealError
from seal_gguf.fileio import atomic_dir, check_output_path, first_line, require_gguf
from seal_gguf.gguffile.header import read_metadata
from seal_gguf.gguffile.metadata import gguf_seal_metadata
from seal_gguf.gguffile.split import single_gguf
from seal_gguf.model.loading import gguf_tokenizer

IMPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The import check: this many tokens of the GGUF's own tokenization of CHECK_TEXT.
CHECK_TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
              "line swift-river: REGISTER_CONTENT is <31452>. What is the pass key? The pass key is 68203.")
CHECK_TOKENS = 48
# Mean KLD (nats per token) the import may differ from the GGUF in llama.cpp by, by GGUF file type:
# float types compute the same weights (float noise only); quantized ones are computed by llama.cpp with
# quantized activations (llama.cpp's q8_0 path), PyTorch with the dequantized weights. A mis-import
# (a wrong attention scale or head size, random weights) is far beyond: 0.1 to several nats.
# SmolLM2-135M Q4_1: 0.0044.
FLOAT_TYPE_MAX_KLD = 1e-4
QUANT_TYPE_MAX_KLD = 5e-2
# ... and what storing the import in a 16-bit dtype adds.
DTYPE_MAX_KLD = {"float32": 0.0, "bfloat16": 1e-2, "float16": 1e-3}


@dataclass(frozen=True)
class ImportCheck:
    tokens: int
    mean_kld: float
    same_top: float
    limit: float


def derive_config(config: Any, metadata: dict[str, Any]) -> list[str]:
    """Set the config values llama.cpp derives from the GGUF where transformers' GGUF mapping keeps its
    own defaults; return 'name: old -> new' for each value changed."""
    arch = metadata.get("general.architecture")
    changes: list[str] = []

    def put(name: str, value: Any) -> None:
        old = getattr(config, name, None)
        if value is not None and old != value:
            setattr(config, name, value)
            changes.append(f"{name}: {old} -> {value}")

    def count(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        if isinstance(value, list) and value and len(set(value)) == 1:
            value = value[0]
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    key_length, heads = count("attention.key_length"), count("attention.head_count")
    hidden, layers = count("embedding_length"), count("block_count")
    # the head size is the key length (Qwen3-0.6B: 16 heads x 128 over a hidden size of 1024)
    if key_length is not None and hasattr(config, "head_dim"):
        put("head_dim", key_length)
    if arch in ("gemma2", "gemma3") and key_length is not None:
        # llama.cpp: the attention scale is 1/sqrt(key_length), except for the 27B models (46 layers in
        # Gemma 2, 62 in Gemma 3) whose scale is 1/sqrt(hidden / heads)
        big = layers == {"gemma2": 46, "gemma3": 62}[arch]
        put("query_pre_attn_scalar", hidden // heads if big and hidden and heads else key_length)
    return changes


def import_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", force: bool = False,
                progress: bool = True) -> Path:
    """Write the GGUF's model as a plain HF checkpoint in out_dir (dequantized to dtype: float32,
    bfloat16 or float16), with its tokenizer and chat template; return out_dir.

    Written only when it is the GGUF's model: config values transformers does not read are derived
    as llama.cpp derives them, and the import is compared with the GGUF in llama.cpp on a short
    token sequence first. A GGUF with folded scales is marked as folded in config.json. Raises
    InputError (not a readable GGUF, a part of a split GGUF missing or not the first, missing
    weights, an import that differs from the GGUF), OutputExistsError (out_dir exists, unless force).
    gguf_path may be the first part of a split GGUF (NAME-00001-of-0000N.gguf): all its parts are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from seal_gguf.model.loading import quiet_transformers  # runners imports this module

    gguf_path = require_gguf(Path(gguf_path))
    check_output_path(Path(out_dir), force, folder=True)  # before the minutes of loading, not after
    metadata = read_metadata(gguf_path)  # a split GGUF's metadata is in its first part
    try:
        # transformers reads one file: a split GGUF's parts merged (llama.cpp, below, loads the parts)
        with single_gguf(gguf_path, Path(out_dir).parent, progress) as source, \
                nullcontext() if progress else quiet_transformers():  # transformers' own bars
            folder, name = str(source.parent), source.name
            tokenizer = gguf_tokenizer(source)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            derive_config(config, metadata)
            # with output_loading_info, transformers returns (model, info); its stubs do not say so
            loaded, info = cast(Any, AutoModelForCausalLM.from_pretrained)(
                folder, gguf_file=name, config=config, dtype=IMPORT_DTYPES[dtype], output_loading_info=True)
    except SealError:
        raise
    except Exception as exc:  # transformers' GGUF reader raises bare struct/index errors on corrupt files
        text = first_line(exc)
        if "ignore_mismatched_sizes" in str(exc):
            text = (f"{text}; the weights do not fit the config transformers derives from the GGUF's metadata: "
                    "its head size or attention layout is one transformers' GGUF mapping does not read")
        raise InputError(f"{gguf_path}: transformers cannot read this GGUF ({text})") from None
    check_loading_info(gguf_path, info)
    # transformers refuses save_pretrained on a model that carries a quantization config:
    # rebuild a plain model of the same class and move the dequantized weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    seal = gguf_seal_metadata(gguf_path)
    if GGUFKeys.SCALES_SHA256 in seal:
        # the weights hold folded scales: recorded so that fold, train and validate refuse the import
        setattr(config, CONFIG_FOLD_KEY, {"granularity": seal.get(GGUFKeys.GRANULARITY),
                                          "scales_sha256": seal[GGUFKeys.SCALES_SHA256],
                                          "seal_gguf_version": seal.get(GGUFKeys.VERSION)})
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    check_import(gguf_path, loaded, dtype, metadata)  # plain has its weights only (buffers on meta)
    with atomic_dir(Path(out_dir), force=force) as tmp, nullcontext() if progress else quiet_transformers():
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def check_loading_info(gguf_path: Path, info: dict[str, Any]) -> None:
    """Refuse an import in which transformers initialised weights the GGUF lacks, dropped weights the
    model has no place for, or found weights of another shape."""
    problems = []
    for key, what in (("missing_keys", "missing from the GGUF (they would be random)"),
                      ("unexpected_keys", "in the GGUF but not in the model"),
                      ("mismatched_keys", "of another shape than the config says")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(key) or [])
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{len(names)} weights {what}: {', '.join(names[:3])}{more}")
    if problems:
        raise InputError(f"{gguf_path}: transformers' import is not this GGUF's model ({'; '.join(problems)})")


def file_type_limit(metadata: dict[str, Any], dtype: str) -> float:
    from seal_gguf.gguffile.metadata import file_type_name

    file_type = metadata.get("general.file_type")
    kind = file_type_name(file_type if isinstance(file_type, int) else None)
    base = FLOAT_TYPE_MAX_KLD if kind in ("f32", "f16", "bf16") else QUANT_TYPE_MAX_KLD
    return base + DTYPE_MAX_KLD[dtype]


def check_import(gguf_path: Path, model: Any, dtype: str, metadata: dict[str, Any]) -> ImportCheck:
    """The imported model (PyTorch, run in float32 from its stored dtype; its parameters are left in
    float32) against the GGUF in llama.cpp
    on the same CHECK_TOKENS token ids: refused (InputError) when their mean KL divergence exceeds what
    the GGUF's type and the dtype cost."""
    from seal_gguf.gguffile.llama import open_llama
    from seal_gguf.kld import PositionStats, summarize_positions

    with open_llama(gguf_path, n_ctx=CHECK_TOKENS + 8) as llm:
        ids = llm.tokenize(CHECK_TEXT.encode("utf-8"), add_bos=True, special=False)[:CHECK_TOKENS]
        if len(ids) < 2:
            raise InputError(f"{gguf_path}: its tokenizer turns text into no tokens")
        if llm.n_vocab() != model.get_output_embeddings().weight.shape[0]:
            raise InputError(f"{gguf_path}: transformers' import has {model.get_output_embeddings().weight.shape[0]} "
                             f"logits per token, llama.cpp {llm.n_vocab()}: not the GGUF's model")
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    # computed in float32 from the weights as stored (transformers refuses .float() on a GGUF import;
    # the caller saves another module that holds the stored tensors)
    for param in model.parameters():
        param.data = param.data.float()
    with torch.no_grad():
        ours = model.eval()(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    stats = PositionStats()
    stats.add(ours[:-1], theirs[:-1], np.asarray(ids[1:]))
    summary = summarize_positions(stats)
    limit = file_type_limit(metadata, dtype)
    if not summary.mean_kld <= limit:
        raise InputError(
            f"{gguf_path}: the imported model is not the model llama.cpp runs from this GGUF: mean KL divergence "
            f"{summary.mean_kld:.3g} over {summary.tokens} tokens (limit {limit:g}), same top token at "
            f"{summary.same_top:.0%} of positions; transformers' GGUF import misreads this architecture's "
            "metadata; nothing was written")
    return ImportCheck(summary.tokens, summary.mean_kld, summary.same_top, limit)
