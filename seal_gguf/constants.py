"""Every name that crosses a file boundary: scales-file fields, config.json and GGUF keys."""

from __future__ import annotations

# -- the scales file (safetensors) --
SCALES_TENSOR = "seal_scales"
SCALES_FORMAT = "seal-scales/1"


class ScalesMeta:
    """Keys of the scales file's safetensors metadata (all values are strings)."""

    FORMAT = "format"
    GRANULARITY = "granularity"
    MODEL_TYPE = "model_type"
    NUM_LAYERS = "num_layers"
    NUM_HEADS = "num_heads"
    HEAD_DIM = "head_dim"
    # where the model's o_proj weights are, for llama.cpp's converter (JSON: architectures.converter_layout)
    LAYOUT = "layout"
    # optional provenance
    TASK = "task"
    SAMPLES = "samples"
    LENGTH = "length"
    LR = "lr"
    LR_SCHEDULE = "lr_schedule"  # "constant" (the paper's) or "cosine" (annealed to 0 over the epoch)
    SEED = "seed"
    BASE_FINGERPRINT = "base_fingerprint"
    SEAL_GGUF_VERSION = "seal_gguf_version"
    COMMAND = "command"
    HELDOUT_BEFORE = "heldout_accuracy_before"
    HELDOUT_AFTER = "heldout_accuracy_after"
    ROPE_SCALING = "rope_scaling"
    # the training objective (issue 19): tasks may be a comma list; lengths drawn from min_length..length
    MIN_LENGTH = "min_length"
    ANCHOR_WEIGHT = "anchor_weight"  # λ of λ·KL(base ‖ SEAL) on anchor text; "0" = the paper's recipe
    ANCHOR_TEXT = "anchor_text"  # "built-in" or the file's name
    ANCHOR_WINDOW = "anchor_window"  # tokens per anchor window
    # what the scales cost on the built-in general (measurement) text, PyTorch, SEAL vs base
    GENERAL_PPL_RATIO = "general_ppl_ratio"
    GENERAL_MEAN_KLD = "general_mean_kld"
    GENERAL_P99_KLD = "general_p99_kld"
    GENERAL_SAME_TOP = "general_same_top1"
    GENERAL_TOKENS = "general_tokens"


REQUIRED_SCALES_META = (
    ScalesMeta.FORMAT,
    ScalesMeta.GRANULARITY,
    ScalesMeta.MODEL_TYPE,
    ScalesMeta.NUM_LAYERS,
    ScalesMeta.NUM_HEADS,
    ScalesMeta.HEAD_DIM,
)

GRANULARITY_HEAD = "head"
GRANULARITY_CHANNEL = "channel"
GRANULARITIES = (GRANULARITY_HEAD, GRANULARITY_CHANNEL)
# How the paper names each granularity.
GRANULARITY_LABEL = {GRANULARITY_HEAD: "SEAL-H", GRANULARITY_CHANNEL: "SEAL-C"}

# -- config.json of a folded HF checkpoint --
CONFIG_FOLD_KEY = "seal_fold"


# -- GGUF metadata written by the converter patch --
class GGUFKeys:
    FORMAT = "seal.format"
    GRANULARITY = "seal.granularity"
    SCALES_SHA256 = "seal.scales_sha256"
    NUM_LAYERS = "seal.num_layers"
    NUM_HEADS = "seal.num_heads"
    HEAD_DIM = "seal.head_dim"
    VERSION = "seal.seal_gguf_version"
    SOURCE_GGUF_SHA256 = "seal.source_gguf_sha256"  # fold-gguf: the GGUF the scales were folded into


GGUF_SEAL_PREFIX = "seal."

# The training recipe (ScalesMeta provenance) a GGUF records as seal.<key>, when the scales have it.
# The converter patch keeps its own copy (RECIPE_KEYS); tests/test_convert.py holds the two equal.
GGUF_RECIPE_KEYS = (
    ScalesMeta.TASK, ScalesMeta.SAMPLES, ScalesMeta.LENGTH, ScalesMeta.LR, ScalesMeta.SEED,
    ScalesMeta.ROPE_SCALING, ScalesMeta.HELDOUT_BEFORE, ScalesMeta.HELDOUT_AFTER, ScalesMeta.BASE_FINGERPRINT,
    ScalesMeta.COMMAND, ScalesMeta.LR_SCHEDULE, ScalesMeta.MIN_LENGTH, ScalesMeta.ANCHOR_WEIGHT,
    ScalesMeta.ANCHOR_TEXT, ScalesMeta.ANCHOR_WINDOW, ScalesMeta.GENERAL_PPL_RATIO, ScalesMeta.GENERAL_MEAN_KLD,
    ScalesMeta.GENERAL_P99_KLD, ScalesMeta.GENERAL_SAME_TOP, ScalesMeta.GENERAL_TOKENS,
)

# Largest finite float16 value: folded weights beyond it cannot be written as f16.
F16_MAX = 65504.0

# llama.cpp's own tools (llama-cli, llama-server) turn flash attention on by default ("auto") where
# the backend has it, CPU included; llama-cpp-python turns it off. Runs here match what users run,
# and it processes 2K-token prompts ~15% faster on CPU.
FLASH_ATTENTION = True

# llama.cpp's key for the Jinja chat template (gguf-py: Keys.Tokenizer.CHAT_TEMPLATE).
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
