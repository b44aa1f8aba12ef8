"""Chat with a GGUF through llama-cpp-python, using the chat template stored in the GGUF.

The session keeps the conversation and streams each reply as it is generated. A document given
with the session goes in front of the first user message. The context is sized to hold that
document (up to the model's training context); when the conversation outgrows it, the session
says so instead of silently dropping text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from seal_gguf.constants import CHAT_TEMPLATE_KEY
from seal_gguf.errors import EngineError, InputError
from seal_gguf.fileio import first_line, require_file, require_gguf
from seal_gguf.gguffile.llama import load_llama

DEFAULT_N_CTX = 4096
REPLY_RESERVE = 1024  # tokens kept free for the conversation after a document
GGUF_TEMPLATE_FORMAT = "chat_template.default"  # llama-cpp-python's name for "the GGUF's own template"


class ContextFull(InputError):
    """The conversation no longer fits the context window."""


def read_document(path: Path) -> str:
    path = require_file(Path(path), "document")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def _round_up(n: int, step: int = 256) -> int:
    return -(-n // step) * step


class ChatSession:
    def __init__(
        self,
        path: Path,
        n_ctx: int | None = None,
        system: str | None = None,
        document: str | None = None,
        max_tokens: int | None = 512,
        temperature: float = 0.2,
        seed: int = 0,
        threads: int | None = None,
    ):
        self.path = require_gguf(Path(path))
        self.name = self.path.name
        self.system = system
        self.document = document
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.threads = threads
        self.messages: list[dict[str, str]] = []
        self.finish_reason: str | None = None
        self.llm = self._open(n_ctx or DEFAULT_N_CTX)
        self.n_ctx_train = self._trained_context()
        if n_ctx is None and document:
            # Grow the default context to hold the document, up to what the model was trained for.
            need = _round_up(len(self.llm.tokenize(document.encode("utf-8"), add_bos=False)) + REPLY_RESERVE)
            limit = self.n_ctx_train or need
            if need > self.n_ctx:
                self.close()
                self.llm = self._open(min(need, limit))
        self.has_template = CHAT_TEMPLATE_KEY in self.llm.metadata
        self.reset()

    def _open(self, n_ctx: int) -> Any:
        return load_llama(self.path, n_ctx, threads=self.threads, seed=self.seed)

    def _trained_context(self) -> int | None:
        meta = self.llm.metadata
        value = meta.get(f"{meta.get('general.architecture')}.context_length")
        return int(value) if value and str(value).isdigit() else None

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    @property
    def tokens_used(self) -> int:
        """Tokens of the conversation held in the context after the last reply."""
        return int(self.llm.n_tokens)

    def reset(self) -> None:
        """Forget the conversation (the document comes back with the next message)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._document_pending = bool(self.document)
        self.llm.reset()

    def _template_tokens(self) -> list[int] | None:
        """The prompt llama-cpp-python builds from the GGUF's template for the current messages."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self.llm.chat_format != GGUF_TEMPLATE_FORMAT:
            return None  # a built-in format llama-cpp-python chose: not worth mirroring

        def text(token: int) -> str:
            return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token != -1 else ""

        formatter = Jinja2ChatFormatter(template=self.llm.metadata[CHAT_TEMPLATE_KEY],
                                        eos_token=text(self.llm.token_eos()), bos_token=text(self.llm.token_bos()))
        result = formatter(messages=self.messages)  # type: ignore[arg-type]  # plain role/content dicts
        return list(self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True))

    def _prefill(self) -> None:
        """Read a long fresh prompt (a document) in batches under a progress bar.

        llama-cpp-python evaluates the prompt in one silent call; evaluated here first, the chat
        call finds it in the cache (prefix match) and only generates. Should the tokens differ,
        the chat call evaluates the difference itself: slower, never wrong.
        """
        if self.llm.n_tokens:
            return
        tokens = self._template_tokens()
        batch = int(self.llm.n_batch)
        if tokens is None or len(tokens) <= batch or len(tokens) >= self.n_ctx:
            return
        todo = tokens[:-1]  # the chat call always evaluates the last prompt token itself
        with tqdm(total=len(todo), unit="tok", desc="reading the prompt", leave=False, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), batch):
                chunk = todo[start:start + batch]
                self.llm.eval(chunk)
                bar.update(len(chunk))

    def ask(self, text: str, progress: bool = False) -> Iterator[str]:
        """Stream the reply to `text` piece by piece; the finished reply joins the history.

        progress: show a bar while a long fresh prompt (a document) is read.
        """
        content = text
        if self._document_pending:
            content = f"{self.document}\n\n{text}"
        self.messages.append({"role": "user", "content": content})
        pieces: list[str] = []
        self.finish_reason = None
        try:
            if progress:
                self._prefill()
            stream = self.llm.create_chat_completion(
                self.messages, stream=True, max_tokens=self.max_tokens, temperature=self.temperature,
                seed=self.seed,
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                piece = choice["delta"].get("content")
                if piece:
                    pieces.append(piece)
                    yield piece
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        except (ValueError, RuntimeError) as exc:
            self.messages.pop()
            if "exceed context window" in str(exc):
                raise self._overflow(str(exc)) from None
            raise EngineError(f"{self.name}: llama.cpp failed to answer ({first_line(exc)})") from None
        except BaseException:
            self.messages.pop()  # an interrupted turn leaves no half answer in the history
            raise
        self._document_pending = False
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    @property
    def context_full(self) -> bool:
        """The last reply stopped because the context ran out (not because of max_tokens)."""
        return self.finish_reason == "length" and self.tokens_used >= self.n_ctx - 1

    def _overflow(self, message: str) -> ContextFull:
        # llama-cpp-python: "Requested tokens (N) exceed context window of M"
        digits = [int(w.strip("()")) for w in message.split() if w.strip("()").isdigit()]
        need = digits[0] if digits else self.n_ctx
        advice = f"start again with --n-ctx {_round_up(need + REPLY_RESERVE)}"
        if self.n_ctx_train and need > self.n_ctx_train:
            advice = f"the model was trained for {self.n_ctx_train} tokens; use a shorter document or question"
        return ContextFull(
            f"the conversation needs {need} tokens but the context holds {self.n_ctx}; {advice}"
        )

    def close(self) -> None:
        self.llm.close()
