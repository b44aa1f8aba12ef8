"""`seal-gguf serve`: an OpenAI-compatible HTTP server for a GGUF, through llama-cpp-python's own.

llama-cpp-python's server (its `server` extra: FastAPI, uvicorn) runs in this process. Chat
completions use the GGUF's own chat template: with no chat format given, llama-cpp-python takes
tokenizer.chat_template from the GGUF. The context defaults to the model's own, capped, or the
length the SEAL scales were learned at where that is longer (seal_gguf.ship.provenance).
The port is bound before the model is loaded, so a port in use fails at once.
"""

from __future__ import annotations

import errno
import importlib.util
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from seal_gguf.constants import FLASH_ATTENTION
from seal_gguf.errors import EngineError, InputError
from seal_gguf.fileio import require_gguf
from seal_gguf.gguffile.llama import load_error
from seal_gguf.gguffile.metadata import read_gguf_facts
from seal_gguf.ship.provenance import default_context, find_recipe

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# What llama-cpp-python's server extra installs, by import name.
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def server_extra_command() -> str:
    try:
        pin = f"=={metadata.version('llama-cpp-python')}"
    except metadata.PackageNotFoundError:
        pin = ""
    return f'pip install "llama-cpp-python[server]{pin}"'


def require_server_extra() -> None:
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise EngineError(f"the server needs llama-cpp-python's server extra (missing: {', '.join(missing)}); "
                          f"install it with: {server_extra_command()}")


@dataclass(frozen=True)
class ServePlan:
    model: Path
    host: str
    port: int
    n_ctx: int
    ctx_reason: str
    has_template: bool  # the GGUF carries a chat template (else llama-cpp-python's llama-2 format)

    @property
    def alias(self) -> str:
        """The model name the API reports (and any name a client sends is served by this model)."""
        return self.model.name

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"


def plan_server(model: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, n_ctx: int | None = None,
                scales: Path | None = None) -> ServePlan:
    """Check the extra and the GGUF; choose the context. Nothing is loaded or bound yet."""
    require_server_extra()
    model = require_gguf(Path(model))
    if not 0 < port < 65536:
        raise InputError(f"--port must be 1..65535 (got {port})")
    facts = read_gguf_facts(model)
    if n_ctx is None:
        n_ctx, reason = default_context(facts, find_recipe(facts, scales))
    elif n_ctx <= 0:
        raise InputError(f"--n-ctx must be a positive number of tokens (got {n_ctx})")
    else:
        reason = "given with --n-ctx"
    return ServePlan(model, host, port, n_ctx, reason, facts.chat_template is not None)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it); one clear error when that is not possible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InputError(f"{host}: not an address to listen on ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closed server's port is free
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"{host}:{port} is already in use; choose another --port") from None
        if exc.errno == errno.EACCES:
            raise InputError(f"{host}:{port}: permission denied (ports below 1024 need privileges); "
                             "choose another --port") from None
        raise InputError(f"{host}:{port}: cannot listen there ({exc.strerror})") from None
    return sock


class LlamaServer:
    """The bound port and the loaded model; run() serves until Ctrl-C (then raises KeyboardInterrupt)."""

    def __init__(self, plan: ServePlan, threads: int | None = None, api_key: str | None = None,
                 verbose: bool = False):
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings

        self.plan = plan
        self.sock = bind(plan.host, plan.port)
        thread_counts: dict[str, Any] = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
        try:
            # chat_format None: llama-cpp-python formats chats with the GGUF's tokenizer.chat_template
            settings = ModelSettings(model=str(plan.model), model_alias=plan.alias, n_ctx=plan.n_ctx,
                                     chat_format=None, flash_attn=FLASH_ATTENTION, verbose=verbose, **thread_counts)
            app = create_app(server_settings=ServerSettings(host=plan.host, port=plan.port, api_key=api_key),
                             model_settings=[settings])
        except (ValueError, RuntimeError, OSError) as exc:
            self.sock.close()
            raise load_error(plan.model, exc) from None
        except BaseException:
            self.sock.close()
            raise
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="info" if verbose else "warning"))

    def run(self) -> None:
        # uvicorn shuts down gracefully on Ctrl-C / SIGTERM, then raises the signal again
        self.server.run(sockets=[self.sock])

    def close(self) -> None:
        self.sock.close()
