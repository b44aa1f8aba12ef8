"""Model runners for evaluation: a GGUF through llama-cpp-python, an HF folder through PyTorch.

Both take the same prompt text (chat template included), tokenize it with their own tokenizer,
add a BOS token only where the model asks for one and the text does not already start with it,
and continue it greedily. Scoring needs nothing more: no logits are kept beyond the last position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from seal_gguf.errors import EngineError, InputError
from seal_gguf.fileio import first_line, require_gguf
from seal_gguf.gguffile.llama import load_llama
from seal_gguf.model.architectures import model_layout
from seal_gguf.model.generate import greedy_continuation
from seal_gguf.model.loading import load_model, load_tokenizer
from seal_gguf.model.rope import RopeScaling
from seal_gguf.texts import special_prefix


class Runner(Protocol):
    name: str
    @property
    def n_ctx(self) -> int | None: ...  # the context the runner was opened with; None: the model's own limit

    def tokenize(self, prompt: str) -> list[int]: ...

    def generate(self, prompt: str, max_tokens: int) -> str: ...

    def close(self) -> None: ...


def _with_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    """ids with the tokenizer's special prefix (BOS) added unless the text already starts with it."""
    if prefix and ids[: len(prefix)] != prefix:
        return prefix + ids
    return ids


class GGUFRunner:
    """A GGUF run by llama-cpp-python: the prompt processed once, then greedy tokens."""

    def __init__(self, path: Path, n_ctx: int | None = None, gpu: bool = False, threads: int | None = None):
        self.path = require_gguf(Path(path))
        self.name = self.path.name
        # logits_all stays off: it would compute the vocabulary-wide output layer at every prompt
        # position, which costs more than the rest of the model on small models.
        self.llm = load_llama(self.path, n_ctx or 0, threads=threads, gpu=gpu)
        self.n_ctx = self.llm.n_ctx()
        # llama.cpp adds BOS (add_special) only when the GGUF asks for it.
        self._prefix = self.llm.tokenize(b"", add_bos=True, special=True)

    def tokenize(self, prompt: str) -> list[int]:
        ids = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        return _with_prefix(ids, self._prefix)

    def generate(self, prompt: str, max_tokens: int) -> str:
        ids = self.tokenize(prompt)
        if len(ids) + max_tokens > self.n_ctx:
            raise InputError(
                f"{self.name}: a prompt of {len(ids)} tokens plus {max_tokens} answer tokens does not fit "
                f"the context of {self.n_ctx} tokens"
            )
        try:
            out = self.llm.create_completion(
                ids, max_tokens=max_tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"{self.name}: llama.cpp failed to generate ({first_line(exc)})") from None
        return str(out["choices"][0]["text"])  # type: ignore[index]

    def close(self) -> None:
        self.llm.close()


class HFRunner:
    """An HF folder run by PyTorch in float32, optionally with SEAL scales applied by hooks and its
    context extended by a RoPE scaling."""

    def __init__(self, folder: Path, scales: Path | None = None, device: str = "cpu", threads: int | None = None,
                 rope: RopeScaling | None = None):
        from seal_gguf.model.hooks import attach_scales
        from seal_gguf.scales import load_scales

        self.path = Path(folder)
        self.name = self.path.name + (f"+{Path(scales).name}" if scales else "")
        self.n_ctx = None
        self.device = torch.device(device)
        # scales that do not fit are refused before the weights are read
        values = load_scales(Path(scales), model_layout(self.path)).values.to(self.device) if scales else None
        # a folded checkpoint runs as it is; scales are applied only to the original model
        self.model, layout = load_model(self.path, self.device, "float32", progress=False, rope=rope,
                                        folded_ok=values is None)
        self.model.config.use_cache = True  # generation reuses its KV cache
        self.hooks = None if values is None else attach_scales(self.model, layout, values)
        self.tokenizer = load_tokenizer(self.path)
        self._prefix = special_prefix(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._eos = {int(i) for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        self._threads_before = torch.get_num_threads()  # a process-wide setting: restored by close()
        if threads:
            torch.set_num_threads(threads)

    def tokenize(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return _with_prefix(list(ids), self._prefix)

    def generate(self, prompt: str, max_tokens: int) -> str:
        new = greedy_continuation(self.model, self.tokenize(prompt), max_tokens, self._eos, self.device)
        return str(self.tokenizer.decode(new, skip_special_tokens=True))

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        del self.model
        torch.set_num_threads(self._threads_before)


def open_runner(model: Path, scales: Path | None = None, n_ctx: int | None = None, device: str = "cpu",
                threads: int | None = None, rope: RopeScaling | None = None) -> Runner:
    """A GGUF file runs in llama.cpp (scales and context extension must already be in it); a folder
    runs in PyTorch."""
    model = Path(model)
    if model.is_dir():
        return HFRunner(model, scales=scales, device=device, threads=threads, rope=rope)
    if not model.exists():
        raise InputError(f"{model}: no such GGUF file or model folder")
    if scales:
        raise InputError(
            f"{model}: --scales applies to HF model folders only; a GGUF carries its scales folded into its weights"
        )
    if rope is not None:
        raise InputError(f"{model}: --rope-scaling applies to HF model folders only; a GGUF carries its context "
                         "extension in its metadata (convert it with --rope-scaling)")
    return GGUFRunner(model, n_ctx=n_ctx, gpu=device != "cpu", threads=threads)
