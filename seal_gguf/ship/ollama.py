"""An Ollama Modelfile beside a GGUF: FROM, the chat template in Ollama's syntax, stops, num_ctx.

A GGUF stores its chat template in Jinja (tokenizer.chat_template); Ollama wants a Go template.
The known families (ChatML, Llama 3, Mistral [INST], Gemma, Phi-3) have Ollama templates here as
data. The family is recognised by rendering: the Ollama template, run the way Ollama runs it (the
Modelfile's SYSTEM put first when a conversation has no system message, consecutive turns of one
role merged) by a small renderer of the Go-template subset the templates use, must give exactly
the prompt the GGUF's Jinja template gives (rendered as llama-cpp-python renders it) for a
two-turn conversation, with and without a system message. A system message the Jinja template
inserts by itself (SmolLM2's) becomes the Modelfile's SYSTEM.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from seal_gguf import __version__
from seal_gguf.errors import InputError
from seal_gguf.fileio import atomic_file, check_output_path, require_file, require_gguf
from seal_gguf.gguffile.metadata import GGUFFacts, read_gguf_facts
from seal_gguf.ship.gotemplate import (
    GoTemplateError,
    Unsupported,
    parse_go_template,
    render_go_template,
)
from seal_gguf.ship.provenance import default_context, find_recipe

MODELFILE_SUFFIX = ".Modelfile"


# -- known chat template families, as data --

@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str  # text every Jinja template of the family contains (for the error message only)
    templates: tuple[str, ...]  # Ollama templates, tried in order; the first that renders identically wins
    stop: tuple[str, ...]


FAMILIES: tuple[ChatFamily, ...] = (
    ChatFamily(
        "ChatML", "<|im_start|>",
        ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",),
        ("<|im_start|>", "<|im_end|>"),
    ),
    ChatFamily(
        "Llama 3", "<|start_header_id|>",
        ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
         "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",),
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFamily(
        # Mistral's templates reject system messages; Ollama's are dropped. Mistral-7B-Instruct puts
        # a space after </s>, Mixtral does not.
        "Mistral", "[INST]",
        ('{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
         '{{- else if eq .Role "assistant" }}{{ .Content }}</s> {{ end }}{{ end }}',
         '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
         '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{ end }}{{ end }}'),
        ("[INST]", "[/INST]"),
    ),
    ChatFamily(
        "Gemma", "<start_of_turn>",
        ('{{- range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n{{ .Content }}<end_of_turn>\n'
         '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
         "{{ end }}{{ end }}<start_of_turn>model\n",),
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    ChatFamily(
        "Phi-3", "<|user|>",
        ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",),
        ("<|system|>", "<|user|>", "<|end|>", "<|assistant|>"),
    ),
)


# -- the Go text/template subset Ollama templates use --

def ollama_prompt(template: str, messages: Sequence[dict[str, str]], system: str | None) -> str:
    """The prompt Ollama builds for a chat: SYSTEM first when no system message opens it, turns of one role merged."""
    msgs = [dict(m) for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"]:
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(m)
    data = {
        "System": "\n\n".join(m["content"] for m in msgs if m["role"] == "system"),
        "Messages": [{"Role": m["role"], "Content": m["content"], "ToolCalls": [], "Images": [], "Thinking": ""}
                     for m in collated],
        "Tools": [], "Response": "", "Think": False, "IsThinkSet": False,
    }
    return render_go_template(template, data)


# -- the GGUF's template and the comparison --

PROBE_SYSTEM = "You answer in one short sentence."
PROBE_TURNS = (
    {"role": "user", "content": "Where is the spare key?"},
    {"role": "assistant", "content": "Under the blue flowerpot."},
    {"role": "user", "content": "And the car key?"},
)
# stands for a system message when finding the one the template inserts by itself
SYSTEM_MARK = "\u2063SEAL-SYSTEM\u2063"


class JinjaChat:
    """The GGUF's Jinja template, rendered as llama-cpp-python renders it, BOS left to the tokenizer."""

    def __init__(self, facts: GGUFFacts):
        from jinja2 import TemplateError
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.facts = facts
        try:
            self.formatter = Jinja2ChatFormatter(template=facts.chat_template or "", eos_token=facts.eos_text,
                                                 bos_token=facts.bos_text)
        except TemplateError as exc:
            raise InputError(f"{facts.path}: its chat template is not valid Jinja ({exc})") from None

    def render(self, messages: Sequence[dict[str, str]]) -> str | None:
        """The prompt, or None when the template refuses the conversation (raise_exception)."""
        from jinja2 import TemplateError

        try:
            prompt = self.formatter(messages=[dict(m) for m in messages]).prompt  # type: ignore[misc]
        except (ValueError, TemplateError):
            return None
        bos = self.facts.bos_text
        # llama.cpp and Ollama add BOS themselves when the GGUF asks for it; the text must not repeat it
        if self.facts.add_bos and bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        return prompt

    def default_system(self) -> str | None:
        """The system message the template inserts when a conversation has none (None: it inserts none)."""
        user = [PROBE_TURNS[0]]
        marked = self.render([{"role": "system", "content": SYSTEM_MARK}, *user])
        plain = self.render(user)
        if marked is None or plain is None or marked.count(SYSTEM_MARK) != 1:
            return None
        before, after = marked.split(SYSTEM_MARK)
        if len(plain) > len(before) + len(after) and plain.startswith(before) and plain.endswith(after):
            return plain[len(before):len(plain) - len(after)]
        return None


def first_text_difference(expected: str, got: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), min(len(expected), len(got)))
    return (f"at character {at} the GGUF's template gives {expected[max(0, at - 20):at + 30]!r}, "
            f"the Ollama template {got[max(0, at - 20):at + 30]!r}")


def compare(template: str, jinja: JinjaChat, system: str | None) -> str | None:
    """None when the Ollama template gives the GGUF template's prompts; else where they first differ.

    Two turns without a system message (the Modelfile's SYSTEM, if any, then opens it), and the
    same with one, where the GGUF's template accepts system messages.
    """
    plain = list(PROBE_TURNS)
    with_system = [{"role": "system", "content": PROBE_SYSTEM}, *plain]
    expected = jinja.render(plain)
    if expected is None:
        raise InputError(f"{jinja.facts.path}: its chat template refuses a plain user/assistant conversation")
    for conversation, want in ((plain, expected), (with_system, jinja.render(with_system))):
        if want is None:
            continue
        got = ollama_prompt(template, conversation, system)
        if got != want:
            return first_text_difference(want, got)
    return None


@dataclass(frozen=True)
class Translation:
    family: str | None  # None: the user's own template
    template: str
    system: str | None  # the Modelfile's SYSTEM: the one the GGUF's template inserts by itself
    stop: tuple[str, ...]
    checked: bool  # the template gives the GGUF template's prompts (compared here)
    warnings: tuple[str, ...] = ()


def translate(facts: GGUFFacts) -> Translation:
    """The known family whose Ollama template reproduces the GGUF's chat template."""
    if facts.chat_template is None:
        raise InputError(f"{facts.path}: has no chat template (tokenizer.chat_template); "
                         "pass --template FILE with an Ollama (Go) template")
    jinja = JinjaChat(facts)
    system = jinja.default_system()
    for family in FAMILIES:
        for template in family.templates:
            if compare(template, jinja, system) is None:
                return Translation(family.name, template, system, family.stop, checked=True)
    near = next((f for f in FAMILIES if f.marker in facts.chat_template), None)
    if near is not None:
        difference = compare(near.templates[0], jinja, system)
        raise InputError(f"{facts.path}: its chat template looks like {near.name}, but no {near.name} template for "
                         f"Ollama gives the same prompt ({difference}); write one and pass --template FILE")
    raise InputError(f"{facts.path}: its chat template is none of the known families "
                     f"({', '.join(f.name for f in FAMILIES)}); pass --template FILE with an Ollama (Go) template")


def own_template(facts: GGUFFacts, path: Path, stop: Sequence[str] = ()) -> Translation:
    """The user's Ollama template, compared with the GGUF's where the renderer can (warnings otherwise)."""
    path = require_file(Path(path), "template file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    try:
        parse_go_template(text)
    except GoTemplateError as exc:
        raise InputError(f"{path}: not a valid Go template ({exc})") from None
    except Unsupported:
        pass  # valid for Ollama; reported below as not checked
    near = next((f for f in FAMILIES if f.marker in text), None)
    stops = tuple(stop) or (near.stop if near else ())
    if facts.chat_template is None:
        return Translation(None, text, None, stops, False,
                           (f"{facts.path.name} has no chat template: {path.name} was not compared with one",))
    jinja = JinjaChat(facts)
    system = jinja.default_system()
    try:
        difference = compare(text, jinja, system)
    except Unsupported as exc:
        return Translation(None, text, system, stops, False,
                           (f"{path.name} was not compared with the GGUF's chat template: it uses {exc}, beyond "
                            "seal-gguf's template checker",))
    if difference is not None:
        return Translation(None, text, system, stops, False,
                           (f"{path.name} gives a different prompt than the GGUF's chat template: {difference}",))
    return Translation(None, text, system, stops, True)


# -- the Modelfile --

def default_modelfile(gguf: Path) -> Path:
    return Path(gguf).with_suffix(MODELFILE_SUFFIX)


def ollama_name(gguf: Path) -> str:
    """A model name Ollama accepts, from the GGUF's file name."""
    return re.sub(r"[^a-z0-9._-]+", "-", Path(gguf).stem.lower()).strip("-._") or "model"


def _quoted(text: str, what: str) -> str:
    """text as a Modelfile value in triple quotes; refused where Ollama's parser would alter it."""
    if '"""' in text:
        raise InputError(f"the {what} contains \"\"\", which a Modelfile cannot quote")
    if not all(c.isprintable() or c in "\n\t\r" for c in text):  # Ollama's parser drops the others
        raise InputError(f"the {what} contains a control character that Ollama's Modelfile parser drops")
    return f'"""{text}"""'


def modelfile_text(gguf: Path, modelfile: Path, translation: Translation, num_ctx: int, ctx_reason: str) -> str:
    try:
        relative = os.path.relpath(Path(gguf).resolve(), Path(modelfile).resolve().parent)
        source = relative if relative.startswith("..") else f"./{relative}"
    except ValueError:  # another drive (Windows)
        source = str(Path(gguf).resolve())
    origin = f"the {translation.family} template" if translation.family else "given with --template"
    if translation.checked:
        origin += ", checked to give the GGUF's chat template's prompts"
    lines = [f"# Ollama Modelfile for {Path(gguf).name}, written by seal-gguf {__version__}.",
             f"#   ollama create {ollama_name(gguf)} -f {Path(modelfile).name}",
             f"# TEMPLATE: {origin}.",
             f"# num_ctx: {ctx_reason}.",
             f"FROM {source}",
             f"TEMPLATE {_quoted(translation.template, 'chat template')}"]
    if translation.system:
        lines.append(f"SYSTEM {_quoted(translation.system, 'default system message')}")
    for token in translation.stop:
        if '"' in token or not token.isprintable():
            raise InputError(f"stop token {token!r} cannot be written to a Modelfile")
        lines.append(f'PARAMETER stop "{token}"')
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ModelfileResult:
    path: Path
    gguf: Path
    translation: Translation
    num_ctx: int
    ctx_reason: str
    warnings: tuple[str, ...]


def write_modelfile(gguf: Path, out: Path | None = None, *, template: Path | None = None, stop: Sequence[str] = (),
                    num_ctx: int | None = None, scales: Path | None = None, force: bool = False) -> ModelfileResult:
    """Write an Ollama Modelfile for `gguf` (default: NAME.Modelfile beside it); `ollama create` takes it as is.

    num_ctx: default the length the scales were learned at (their recipe, found by the sha256 the
    GGUF records: `scales`, or the bundled scales), else the model's context length, capped.
    """
    gguf = require_gguf(Path(gguf))
    out = Path(out) if out is not None else default_modelfile(gguf)
    if num_ctx is not None and num_ctx <= 0:
        raise InputError(f"--num-ctx must be a positive number of tokens (got {num_ctx})")
    check_output_path(out, force, inputs=[gguf, template, scales])
    facts = read_gguf_facts(gguf)  # a split GGUF: every part checked
    if facts.parts > 1:
        # ollama/ollama#5245: `ollama create` reads one GGUF file
        raise InputError(f"{gguf}: the first of {facts.parts} parts of a split GGUF; Ollama imports one GGUF file, "
                         "so merge the parts first (llama.cpp's llama-gguf-split --merge) or convert without "
                         "--split-max-size")
    translation = own_template(facts, template, stop) if template is not None else translate(facts)
    if translation.family is not None and stop:
        translation = Translation(translation.family, translation.template, translation.system, tuple(stop), True)
    if num_ctx is None:
        num_ctx, reason = default_context(facts, find_recipe(facts, scales))
    else:
        reason = "given with --num-ctx"
    warnings = list(translation.warnings)
    if facts.context_length is not None and num_ctx > facts.context_length:
        warnings.append(f"num_ctx {num_ctx} is beyond the model's context length {facts.context_length}")
    text = modelfile_text(gguf, out, translation, num_ctx, f"{num_ctx}, {reason}")
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return ModelfileResult(out, gguf, translation, num_ctx, reason, tuple(warnings))
