"""Shipping a GGUF: the OpenAI-compatible server, Ollama Modelfiles, the model card.

Ollama cannot run here, so its side is checked the way it reads things: the Modelfile parsed by a
port of Ollama's own parser, the Go template rendered by seal-gguf's renderer (itself checked
against outputs of Go's text/template from Ollama's tests) and compared with the GGUF's Jinja
template rendered by jinja2, conversation by conversation.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import one_line_error
from interrupts import default_sigint

from seal_gguf.cli.app import cli
from seal_gguf.constants import ScalesMeta
from seal_gguf.gguffile.metadata import GGUFFacts, read_gguf_facts
from seal_gguf.learn.objective import DEFAULT_ANCHOR_WEIGHT
from seal_gguf.ship.gotemplate import GoTemplateError, Unsupported, render_go_template
from seal_gguf.ship.ollama import FAMILIES, own_template, translate
from seal_gguf.ship.provenance import MAX_DEFAULT_CTX, Recipe, default_context

# -- helpers --


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args: object) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """Ollama's Modelfile parser (parser/parser.go, ParseFile and parseRuneForState), ported line by line."""
    def unquote(s: str) -> tuple[str, bool]:
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    def step(r: str, state: str) -> tuple[str, str]:
        space, newline = r in " \t", r in "\r\n"
        if state == "nil":
            return ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
        if state == "name":
            assert r.isascii() and (r.isalpha() or space), f"invalid command character {r!r}"
            return ("name", r) if r.isalpha() else ("value", "")
        if state == "value":
            return ("nil", r) if space or newline else ("value", r)
        if state == "parameter":
            return ("parameter", r) if (r.isascii() and r.isalnum()) or r == "_" else ("value", "")
        return ("nil", "") if newline else ("comment", "")

    commands: list[tuple[str, str]] = []
    state, buf, name = "nil", "", ""
    for r in text:
        nxt, r2 = step(r, state)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                assert word in ("from", "license", "template", "system", "adapter", "parameter", "message"), word
                name = "model" if word == "from" else word
                if word == "parameter":
                    nxt = "parameter"
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, done = unquote(buf.strip())
                if not done or r in " \t":
                    buf += r
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if r2 and r2.isprintable():
            buf += r2
    if state == "value":
        value, done = unquote(buf.strip())
        assert done, "unterminated quote"
        commands.append((name, value))
    return commands


def jinja_prompt(template: str, messages: list[dict[str, str]], bos: str, eos: str, add_bos: bool) -> str | None:
    """The Jinja chat template rendered by jinja2 as transformers renders it; BOS left to the tokenizer."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                                add_generation_prompt=True, raise_exception=raise_exception)
    except ValueError:
        return None
    return text[len(bos):] if add_bos and bos and text.startswith(bos) else text


def ollama_render(modelfile: list[tuple[str, str]], messages: list[dict[str, str]]) -> str:
    """What Ollama sends to the model for a chat: the Modelfile's SYSTEM first when none opens it."""
    from seal_gguf.ship.ollama import ollama_prompt

    fields = dict(modelfile)
    return ollama_prompt(fields["template"], messages, fields.get("system"))


SYSTEM = {"role": "system", "content": "Keep it short."}
TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Name a colour."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the Go-template renderer against Go itself --

# Templates, messages and the outputs of Go's text/template, from Ollama's template_test.go
# (TestExecuteWithMessages; ollama/ollama, MIT license).
GO_CASES = [
    ('[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n{{- if eq .Role "user" }}'
     '{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}{{ .Content }}[INST] {{ end }}\n{{- end }}',
     [("user", "Hello friend!"), ("assistant", "Hello human!"), ("user", "What is your name?")],
     "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    ('[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n{{- if eq .Role "user" }}'
     '{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}{{ .Content }}[INST] {{ end }}\n{{- end }}',
     [("system", "You are a helpful assistant!"), ("user", "Hello friend!"), ("assistant", "Hello human!"),
      ("user", "What is your name?")],
     "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    ('\n{{- range $i, $m := .Messages }}\n{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST] '
     '{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}\n{{- end }}',
     [("user", "Hello friend!"), ("assistant", "Hello human!"), ("user", "What is your name?"),
      ("assistant", "My name is Ollama and I")],
     "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"),
    ("\n{{- range $index, $_ := .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
     "<|im_start|>assistant\n",
     [("system", "You are a helpful assistant!"), ("user", "Hello friend!"), ("assistant", "Hello human!"),
      ("user", "What is your name?")],
     "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n<|im_start|>user\nHello friend!<|im_end|>\n"
     "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
     "<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("template, messages, expected", GO_CASES)
def test_renderer_matches_go_text_template(template: str, messages: list, expected: str) -> None:
    from seal_gguf.ship.ollama import ollama_prompt

    assert ollama_prompt(template, [{"role": r, "content": c} for r, c in messages], None) == expected


def test_renderer_subset() -> None:
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": ""}
    # Gemma's Ollama template: variables, len/slice, and/not, trim markers on both sides
    template = ('{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
                '{{- if and (eq .Role "user") (not $last) }}U:{{ .Content }}|{{- else }}X:{{ .Content }}{{ end }}'
                "{{- end }} {{/* a comment */}}{{ if $.System }}S{{ else }}-{{ end }}")
    assert render_go_template(template, data) == "U:a|X:b -"
    assert render_go_template("{{ range .Messages }}{{ else }}none{{ end }}", {"Messages": []}) == "none"
    for broken in ("{{ if .System }}x", "{{ end }}", "{{ else }}", "{{ $x = 1 }}"):
        with pytest.raises(GoTemplateError):
            render_go_template(broken, data)
    for beyond in ("{{ .Prompt }}", "{{ with .System }}x{{ end }}", "{{ .Content | json }}", "{{ printf \"%s\" 1 }}"):
        with pytest.raises(Unsupported):
            render_go_template(beyond, data)


# -- chat template families --

def facts_for(template: str, bos: str = "<s>", eos: str = "</s>", add_bos: bool = True) -> GGUFFacts:
    return GGUFFacts(Path("model.gguf"), {"tokenizer.chat_template": template, "tokenizer.ggml.add_bos_token": add_bos},
                     bos, eos, 0)


def family_templates() -> list[tuple[str, str, str, str, bool]]:
    """Real chat templates (as stored in GGUFs) and the family each belongs to."""
    from llama_cpp import llama_chat_format as f

    qwen2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
             "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
             "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    gemma2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
              "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
    phi3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
            "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
    phi35 = phi3.replace("message['role'] == 'system' %}", "message['role'] == 'system' and message['content'] %}")
    return [
        ("plain ChatML", f.CHATML_CHAT_TEMPLATE, "ChatML", "<|endoftext|>", False),
        ("Qwen2", qwen2, "ChatML", "<|endoftext|>", False),
        ("Llama 3", f.LLAMA3_INSTRUCT_CHAT_TEMPLATE, "Llama 3", "<|begin_of_text|>", True),
        ("Mistral 7B", f.MISTRAL_INSTRUCT_CHAT_TEMPLATE, "Mistral", "<s>", True),
        ("Mixtral", f.MIXTRAL_INSTRUCT_CHAT_TEMPLATE, "Mistral", "<s>", True),
        ("Gemma 2", gemma2, "Gemma", "<bos>", True),
        ("Phi-3", phi3, "Phi-3", "<s>", False),
        ("Phi-3.5", phi35, "Phi-3", "<s>", False),
    ]


@pytest.mark.parametrize("case", family_templates(), ids=lambda c: c[0])
def test_each_family_gives_the_jinja_prompt(case: tuple[str, str, str, str, bool]) -> None:
    _, template, family, bos, add_bos = case
    eos = "</s>"
    translation = translate(facts_for(template, bos, eos, add_bos))
    assert translation.family == family and translation.checked
    assert translation.stop == next(f.stop for f in FAMILIES if f.name == family)
    takes_system = jinja_prompt(template, [SYSTEM, *TURNS], bos, eos, add_bos) is not None
    conversations = [TURNS, TURNS[:1]] + ([[SYSTEM, *TURNS]] if takes_system else [])
    for conversation in conversations:
        got = ollama_render([("template", translation.template), ("system", translation.system or "")], conversation)
        assert got == jinja_prompt(template, conversation, bos, eos, add_bos), conversation
    assert takes_system == (family not in ("Mistral", "Gemma"))


def test_a_variant_of_a_family_is_refused_with_the_difference() -> None:
    from llama_cpp import llama_chat_format as f

    variant = f.LLAMA3_INSTRUCT_CHAT_TEMPLATE.replace("<|end_header_id|>\n\n'+", "<|end_header_id|>\n'+")
    assert variant != f.LLAMA3_INSTRUCT_CHAT_TEMPLATE
    with pytest.raises(Exception, match=r"looks like Llama 3.*at character \d+.*--template FILE"):
        translate(facts_for(variant, "<|begin_of_text|>"))


AYA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
       "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
       "{% set system_message = false %}{% endif %}{% if system_message != false %}"
       "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
       "{% for message in loop_messages %}{% set content = message['content'] %}{% if message['role'] == 'user' %}"
       "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
       "{% elif message['role'] == 'assistant' %}"
       "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% endif %}"
       "{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}")
AYA_OLLAMA = ('{{ if .System }}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{ .System }}<|END_OF_TURN_TOKEN|>{{ end }}'
              '{{- range .Messages }}{{ if eq .Role "user" }}<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{ .Content }}'
              '<|END_OF_TURN_TOKEN|>{{ else if eq .Role "assistant" }}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'
              '{{ .Content }}<|END_OF_TURN_TOKEN|>{{ end }}{{ end }}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>')


def test_unknown_family_needs_a_template_which_is_checked(tmp_path: Path) -> None:
    facts = facts_for(AYA, "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>")
    with pytest.raises(Exception, match="none of the known families.*--template FILE"):
        translate(facts)
    good = tmp_path / "aya.gotmpl"
    good.write_text(AYA_OLLAMA, encoding="utf-8")
    translation = own_template(facts, good, ["<|END_OF_TURN_TOKEN|>"])
    assert translation.checked and not translation.warnings and translation.stop == ("<|END_OF_TURN_TOKEN|>",)
    wrong = tmp_path / "wrong.gotmpl"
    wrong.write_text(AYA_OLLAMA.replace("<|CHATBOT_TOKEN|>{{ .Content }}", "{{ .Content }}"), encoding="utf-8")
    assert "gives a different prompt" in own_template(facts, wrong).warnings[0]
    legacy = tmp_path / "legacy.gotmpl"  # Ollama's older style: beyond the checker, not wrong
    legacy.write_text("{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}{{ .Response }}", encoding="utf-8")
    assert "not compared" in own_template(facts, legacy).warnings[0]


# -- the ollama command on the shipped SmolLM2 GGUF --

@pytest.mark.slow
def test_ollama_modelfile_for_smollm2(smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "smol.Modelfile"
    out.parent.mkdir()
    output = ok("ollama", smollm2_gguf, "-o", out)
    assert f"ollama create smollm2-135m-instruct.q4_1 -f {out}" in output
    commands = parse_modelfile(out.read_text(encoding="utf-8"))
    fields = dict(commands)
    assert (out.parent / fields["model"]).resolve() == smollm2_gguf.resolve()
    assert fields["num_ctx"] == "8192"  # no SEAL scales: the model's own context length
    assert [v for k, v in commands if k == "stop"] == ["<|im_start|>", "<|im_end|>"]
    assert fields["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    facts = read_gguf_facts(smollm2_gguf)
    for conversation in (TURNS, [SYSTEM, *TURNS]):
        assert ollama_render(commands, conversation) == jinja_prompt(
            facts.chat_template or "", conversation, facts.bos_text, facts.eos_text, facts.add_bos)
    one_line_error(invoke("ollama", smollm2_gguf, "-o", out), "already exists", "--force")
    broken = tmp_path / "broken.gotmpl"
    broken.write_text("{{ range .Messages }}{{ .Content }}", encoding="utf-8")
    one_line_error(invoke("ollama", smollm2_gguf, "-o", tmp_path / "b.Modelfile", "--template", broken),
                   "not a valid Go template")
    assert not (tmp_path / "b.Modelfile").exists()
    one_line_error(invoke("ollama", broken, "-o", tmp_path / "c.Modelfile"), "not a GGUF file")


# -- a tiny model through the real commands: train, convert, fold-and-convert --ollama, validate, eval --

@pytest.fixture(scope="module")
def shipped(tiny_model, module_tmp: Callable[[str], Path]) -> Path:
    work = module_tmp("ship")
    (work / "model").symlink_to(tiny_model("llama"), target_is_directory=True)
    (work / "notes.txt").write_text("The spare key is under the blue flowerpot. " * 12, encoding="utf-8")
    train = ["train", "model", "-o", "scales.safetensors", "--samples", "2", "--length", "320", "--eval-samples", "0",
             "--device", "cpu", "-q"]
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(work)  # relative paths, as a user types them
    sys.argv = ["seal-gguf", *train]  # train records its command line in the scales' recipe
    try:
        ok(*train)
        ok("convert", "model", "-o", "base-f16.gguf", "--outtype", "f16", "-q")
        ok("fold-and-convert", "model", "scales.safetensors", "-o", "seal-f16.gguf", "--outtype", "f16", "--ollama",
           "-q")
        invoke("validate", "model", "scales.safetensors", "seal-f16.gguf", "--base-gguf", "base-f16.gguf",
               "--text", "notes.txt", "--ctx", "64", "--json", "validate.json", "-q")
        ok("eval", "model", "base-f16.gguf", "seal-f16.gguf", "--scales", "scales.safetensors", "--lengths", "320",
           "--samples", "2", "--json", "eval.json", "-q")
    finally:
        os.chdir(cwd)
        sys.argv = argv
    return work


@pytest.mark.parametrize(("native", "learned", "expected"), [
    (8192, 1024, 8192),  # scales learned at 1K still run at the model's own context
    (131072, None, MAX_DEFAULT_CTX),  # capped: a 128K KV cache nobody asked for
    (2048, 4096, 4096),  # scales learned under a context extension: their length
    (None, None, MAX_DEFAULT_CTX),
])
def test_default_context(native: int | None, learned: int | None, expected: int) -> None:
    metadata: dict = {"general.architecture": "llama"} | ({"llama.context_length": native} if native else {})
    facts = GGUFFacts(Path("m.gguf"), metadata, "", "", 0)
    recipe = Recipe(Path("s.safetensors"), {ScalesMeta.LENGTH: str(learned)}) if learned else None
    assert default_context(facts, recipe)[0] == expected


def test_fold_and_convert_writes_the_modelfile(shipped: Path) -> None:
    commands = parse_modelfile((shipped / "seal-f16.Modelfile").read_text(encoding="utf-8"))
    fields = dict(commands)
    assert fields["model"] == "./seal-f16.gguf"
    # the model's own context (the scales were learned at 320 tokens: shorter, so not the default)
    assert fields["num_ctx"] == str(read_gguf_facts(shipped / "seal-f16.gguf").context_length)
    facts = read_gguf_facts(shipped / "seal-f16.gguf")
    assert facts.scales_sha256 is not None
    for conversation in (TURNS, [SYSTEM, *TURNS]):
        assert ollama_render(commands, conversation) == jinja_prompt(
            facts.chat_template or "", conversation, facts.bos_text, facts.eos_text, facts.add_bos)


def test_fold_and_convert_refuses_a_modelfile_before_converting(shipped: Path, tiny_model) -> None:
    (shipped / "other.Modelfile").write_text("FROM ./x.gguf\n", encoding="utf-8")
    result = invoke("fold-and-convert", tiny_model("llama"), shipped / "scales.safetensors", "-o",
                    shipped / "other.gguf", "--ollama", "-q")
    one_line_error(result, "other.Modelfile", "already exists")
    assert not (shipped / "other.gguf").exists()


def test_card_from_real_outputs(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = ok("card", shipped / "seal-f16.gguf", "--validate-json", shipped / "validate.json", "--eval-json",
                shipped / "eval.json", "--license", "apache-2.0")
    assert "recipe from seal-f16.gguf" in output  # the GGUF records the recipe itself: no scales file needed
    card = (shipped / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlicense: apache-2.0\ntags:\n- gguf\n- seal\n- llama.cpp\n---\n")
    validation = json.loads((shipped / "validate.json").read_text(encoding="utf-8"))
    mine = next(g for g in validation["ggufs"] if g["role"] == "seal")
    assert f"| tokens scored | {mine['summary']['tokens']} |" in card
    assert f"{100 * mine['summary']['same_top']:.2f}%" in card
    assert "| case length (tokens) | 320 |" in card and "| training cases | 2 |" in card
    assert f"| anchor weight λ (0: the paper's recipe) | {DEFAULT_ANCHOR_WEIGHT} |" in card  # the GGUF records the whole recipe
    assert "seal-gguf train model -o scales.safetensors" in card
    # gain and cost side by side: this GGUF against the base GGUF of its type, from validate's report
    cost = next(g for g in validation["general"] if g["engine"] == "llama.cpp" and g["seal"] == "seal-f16.gguf")
    assert "## What the scales cost on general text" in card and "`base-f16.gguf`" in card
    assert f"×{cost['cost']['ppl_ratio']:.3f}" in card
    report = json.loads((shipped / "eval.json").read_text(encoding="utf-8"))
    for acc in report["accuracy"]:
        if acc["model"].endswith(".gguf"):
            assert f"{acc['correct']}/{acc['total']} ({100 * acc['accuracy']:.0f}%)" in card
    # the eval command the card shows reproduces the report
    command = next(line for line in card.splitlines() if line.startswith("seal-gguf eval "))
    monkeypatch.chdir(shipped)
    ok(*shlex.split(command.replace("--json eval.json", "--json again.json"))[1:], "-q")
    again = json.loads((shipped / "again.json").read_text(encoding="utf-8"))
    assert again["accuracy"] == report["accuracy"]
    validate_command = next(line for line in card.splitlines() if line.startswith("seal-gguf validate "))
    assert validate_command == ("seal-gguf validate model/ scales.safetensors seal-f16.gguf --base-gguf base-f16.gguf "
                                "--text notes.txt --ctx 64 --json validate.json")


def test_card_from_one_report(shipped: Path, tmp_path: Path) -> None:
    """Either report alone gives a card (each section only where its report is given)."""
    gguf = shipped / "seal-f16.gguf"
    ok("card", gguf, "--eval-json", shipped / "eval.json", "-o", tmp_path / "eval-only.md")
    card = (tmp_path / "eval-only.md").read_text(encoding="utf-8")
    assert "## Validation against the unfolded model" not in card and "What the scales cost" in card
    ok("card", gguf, "--validate-json", shipped / "validate.json", "-o", tmp_path / "validate-only.md")
    card = (tmp_path / "validate-only.md").read_text(encoding="utf-8")
    assert "## Validation against the unfolded model" in card and "`base-f16.gguf`" in card


def test_card_refusals(shipped: Path, tmp_path: Path) -> None:
    gguf = shipped / "seal-f16.gguf"
    (tmp_path / "card.txt").write_text("an earlier card", encoding="utf-8")
    one_line_error(invoke("card", gguf, "-o", tmp_path / "card.txt"), "already exists")
    other = json.loads((shipped / "validate.json").read_text(encoding="utf-8"))
    other["scales_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other), encoding="utf-8")
    one_line_error(invoke("card", gguf, "--validate-json", tmp_path / "other.json", "-o", tmp_path / "a.md"),
                   "validated scales 000000000000")
    one_line_error(invoke("card", shipped / "base-f16.gguf", "--eval-json", shipped / "validate.json", "-o",
                          tmp_path / "b.md"), "not a report of `seal-gguf eval --json`")
    report = json.loads((shipped / "eval.json").read_text(encoding="utf-8"))
    report["models"] = [m for m in report["models"] if m["name"] != "seal-f16.gguf"]
    (tmp_path / "eval.json").write_text(json.dumps(report), encoding="utf-8")
    one_line_error(invoke("card", gguf, "--eval-json", tmp_path / "eval.json", "-o", tmp_path / "c.md"),
                   "holds no results for seal-f16.gguf")
    one_line_error(invoke("card", gguf, "--scales", shipped / "validate.json", "-o", tmp_path / "d.md"),
                   "not a readable safetensors file")
    one_line_error(invoke("card", shipped / "base-f16.gguf", "-o", tmp_path / "e.md"), "not a SEAL GGUF")
    assert not any(tmp_path.glob("*.md"))


# -- the server --

def test_serve_refusals(smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(invoke("serve", smollm2_gguf, "--port", port), f"127.0.0.1:{port} is already in use")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello", encoding="utf-8")
    one_line_error(invoke("serve", not_gguf), "not a GGUF file")
    monkeypatch.setitem(sys.modules, "sse_starlette", None)  # as if the server extra were not installed
    one_line_error(invoke("serve", smollm2_gguf), "server extra", 'pip install "llama-cpp-python[server]==')


@pytest.mark.slow
def test_serve_answers_a_chat_completion_and_stops(smollm2_gguf: Path) -> None:
    from llama_cpp import Llama

    port = free_port()
    command = [sys.executable, "-c", "from seal_gguf.cli import main; main()", "serve", str(smollm2_gguf),
               "--port", str(port), "--n-ctx", "512", "--threads", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                    models = json.load(reply)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer within 120 s"
                time.sleep(0.5)
        assert [m["id"] for m in models["data"]] == [smollm2_gguf.name]
        messages = [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": "What is the capital of France?"}]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"messages": messages, "max_tokens": 8, "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.load(reply)
        assert answer["object"] == "chat.completion"
        choice = answer["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
        assert choice["finish_reason"] in ("stop", "length")
        # the prompt is the GGUF's own chat template, token for token
        facts = read_gguf_facts(smollm2_gguf)
        prompt = jinja_prompt(facts.chat_template or "", messages, facts.bos_text, facts.eos_text, facts.add_bos)
        vocab = Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
        assert answer["usage"]["prompt_tokens"] == len(vocab.tokenize((prompt or "").encode(), special=True))
        server.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err
    assert f"Serving {smollm2_gguf.name} at http://127.0.0.1:{port}/v1" in err and "Server stopped." in err
