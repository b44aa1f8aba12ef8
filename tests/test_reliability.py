"""Every command against bad input, a refusing disk and Ctrl-C: nothing lost, nothing half-written.

One matrix over all commands. In every case: exit code 1 (130 for Ctrl-C), exactly one line on
stderr that names the file and says what is wrong, no traceback, nothing left in the output folder
(no output, no hidden `.NAME.*.tmp`, no intermediate GGUF), and every input unchanged: checked by
size and mtime after each case and by sha256 of every input file once all cases have run.

Already-folded inputs: an HF folder with a seal_fold record is refused by fold and
fold-and-convert (unless --force) and by train, eval --scales and validate. A GGUF with folded
scales is what quantize, eval, chat and validate are for, so they take it; import-gguf takes it
too but marks the import as folded, so that the import cannot be folded twice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from interrupts import default_sigint
from safetensors.torch import save_file

from seal_gguf.cli.app import cli
from seal_gguf.constants import SCALES_FORMAT, SCALES_TENSOR
from seal_gguf.convert.from_gguf import import_gguf
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.model.architectures import model_layout
from seal_gguf.scales import expected_shape, save_scales

SEAL_GGUF = str(Path(sys.executable).with_name("seal-gguf"))


# -- the inputs, good and bad, made once --

@dataclass
class World:
    root: Path
    model: Path  # the tiny llama (2 layers x 4 heads x 64)
    scales: Path  # head scales for it
    gguf: Path  # the tiny llama with those scales folded in, f32
    other_gguf: Path  # a tiny gemma3 GGUF: another architecture
    bad: dict[str, Path] = field(default_factory=dict)

    def entries(self) -> list[Path]:
        """Every file, folder and link of the inputs."""
        found = [self.root, self.model]
        for top in (self.root, self.model):
            for folder, dirs, files in os.walk(top):
                found += [Path(folder) / name for name in dirs + files]
        return sorted(found)

    def input_files(self) -> list[Path]:
        # links point into the model folder, whose files are hashed themselves
        return [p for p in self.entries() if p.is_file() and not p.is_symlink()]

    def stats(self) -> dict[Path, tuple[int, int, int]]:
        """Kind, size and mtime of every entry: a folder's mtime moves when anything is added to it."""
        return {p: (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns) for p in self.entries()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_scales(path: Path, values: torch.Tensor, **meta: str | None) -> Path:
    """A scales file written without seal-gguf's checks; meta overrides the tiny llama's (None drops a key)."""
    full = {"format": SCALES_FORMAT, "granularity": "head", "model_type": "llama", "num_layers": "2",
            "num_heads": "4", "head_dim": "64"}
    full.update(meta)
    save_file({SCALES_TENSOR: values}, str(path), metadata={k: v for k, v in full.items() if v is not None})
    return path


def model_variant(root: Path, name: str, model: Path, config: dict | str | None = None,
                  weights: bytes | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of the model folder (links, except what is replaced): config, weights or extra files changed."""
    out = root / name
    out.mkdir()
    for item in model.iterdir():
        if item.name == "config.json" and config is not None:
            (out / item.name).write_text(config if isinstance(config, str) else json.dumps(config))
        elif item.name == "model.safetensors" and weights is not None:
            (out / item.name).write_bytes(weights)
        else:
            os.symlink(item, out / item.name)
    for name_, data in (extra or {}).items():
        (out / name_).write_bytes(data)
    return out


def build_bad_inputs(w: World) -> None:
    root, bad = w.root, w.bad
    config = json.loads((w.model / "config.json").read_text())
    weights = (w.model / "model.safetensors").read_bytes()
    models = root / "models"
    models.mkdir()
    (models / "empty").mkdir()
    (root / "notes.txt").write_text("a text file, not a model\n")
    bad |= {
        "model: missing folder": root / "absent-model",
        "model: a file": root / "notes.txt",
        "model: empty folder": models / "empty",
        "model: empty config.json": model_variant(models, "empty-config", w.model, config=""),
        "model: corrupt config.json": model_variant(models, "corrupt-config", w.model, config='{"model_type": "lla'),
        "model: config.json not an object": model_variant(models, "list-config", w.model, config="[1, 2]"),
        "model: config.json without head counts": model_variant(models, "no-heads", w.model,
                                                                config={"model_type": "llama"}),
        "model: unsupported architecture": model_variant(models, "gpt2", w.model, config={**config, "model_type": "gpt2"}),
        "model: truncated weights": model_variant(models, "truncated", w.model, weights=weights[: len(weights) // 2]),
        "model: corrupt weights": model_variant(models, "corrupt", w.model, weights=b"\xff" * 64),
        "model: empty weights": model_variant(models, "empty-weights", w.model, weights=b""),
        "model: pickled weights only": model_variant(models, "pickled", w.model, weights=b"",
                                                     extra={"pytorch_model.bin": b"not unpickled"}),
        "model: index lists a missing shard": model_variant(
            models, "index", w.model,
            extra={"model.safetensors.index.json": json.dumps(
                {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}).encode()}),
        "model: config.json has more layers": model_variant(models, "layers", w.model,
                                                            config={**config, "num_hidden_layers": 3}),
        "model: config.json has more heads": model_variant(models, "heads", w.model,
                                                           config={**config, "num_attention_heads": 8}),
        "model: already folded": model_variant(models, "folded", w.model, config={
            **config, "seal_fold": {"granularity": "head", "scales_sha256": "ab" * 32}}),
    }
    (bad["model: pickled weights only"] / "model.safetensors").unlink()

    scales = root / "scales"
    scales.mkdir()
    (scales / "folder.safetensors").mkdir()
    (scales / "empty.safetensors").write_bytes(b"")
    (scales / "garbage.safetensors").write_bytes(os.urandom(256))
    good = w.scales.read_bytes()
    (scales / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    ones = torch.ones(2, 4)

    def with_value(value: float) -> torch.Tensor:
        values = ones.clone()
        values[1, 2] = value
        return values

    bad |= {
        "scales: missing": scales / "absent.safetensors",
        "scales: a folder": scales / "folder.safetensors",
        "scales: empty": scales / "empty.safetensors",
        "scales: random bytes": scales / "garbage.safetensors",
        "scales: truncated": scales / "truncated.safetensors",
        "scales: NaN": raw_scales(scales / "nan.safetensors", with_value(float("nan"))),
        "scales: inf": raw_scales(scales / "inf.safetensors", with_value(float("inf"))),
        "scales: zero": raw_scales(scales / "zero.safetensors", with_value(0.0)),
        "scales: negative": raw_scales(scales / "negative.safetensors", with_value(-0.5)),
        "scales: float16": raw_scales(scales / "f16.safetensors", ones.half()),
        "scales: shape unlike metadata": raw_scales(scales / "shape.safetensors", torch.ones(2, 3)),
        "scales: channel metadata, head values": raw_scales(scales / "granularity.safetensors", ones,
                                                            granularity="channel"),
        "scales: unknown granularity": raw_scales(scales / "layer.safetensors", ones, granularity="layer"),
        "scales: other format": raw_scales(scales / "format.safetensors", ones, format="seal-scales/9"),
        "scales: no metadata": raw_scales(scales / "nometa.safetensors", ones, format=None, num_layers=None),
        "scales: no seal_scales tensor": scales / "other-tensor.safetensors",
        "scales: zero layers": raw_scales(scales / "zero-layers.safetensors", torch.ones(0, 4), num_layers="0"),
        "scales: counts not integers": raw_scales(scales / "counts.safetensors", ones, num_heads="four"),
        "scales: for another model_type": raw_scales(scales / "mistral.safetensors", ones, model_type="mistral"),
        "scales: more layers than the model": raw_scales(scales / "layers.safetensors", torch.ones(3, 4),
                                                          num_layers="3"),
        "scales: more heads than the model": raw_scales(scales / "heads.safetensors", torch.ones(2, 8), num_heads="8"),
        "scales: other head_dim": raw_scales(scales / "head-dim.safetensors", torch.ones(2, 4, 32),
                                             granularity="channel", head_dim="32"),
    }
    save_file({"something_else": ones}, str(bad["scales: no seal_scales tensor"]))

    ggufs = root / "ggufs"
    ggufs.mkdir()
    data = w.gguf.read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4  # then the string's u64 length and its bytes
    length = int.from_bytes(data[at:at + 8], "little")
    (ggufs / "folder.gguf").mkdir()
    for name, content in {"empty": b"", "text": b"not a model, just words\n", "header": data[:100],
                          "metadata": data[:4000], "half": data[: len(data) // 2],
                          "arch": data[:at + 8] + b"z" * length + data[at + 8 + length:]}.items():
        (ggufs / f"{name}.gguf").write_bytes(content)
    bad |= {
        "gguf: missing": ggufs / "absent.gguf",
        "gguf: a folder": ggufs / "folder.gguf",
        "gguf: empty": ggufs / "empty.gguf",
        "gguf: not a GGUF": ggufs / "text.gguf",
        "gguf: cut in the header": ggufs / "header.gguf",
        "gguf: cut in the metadata": ggufs / "metadata.gguf",
        "gguf: cut in the tensors": ggufs / "half.gguf",
        "gguf: unknown architecture": ggufs / "arch.gguf",
        "gguf: another architecture": w.other_gguf,
    }

    other = root / "other"
    other.mkdir()
    (other / "folder.txt").mkdir()
    for name, content in {"empty.txt": b"", "binary.txt": b"\xff\xfe\x00binary", "empty.jsonl": b"",
                          "corrupt.jsonl": b'{"task": "lines", \n', "fields.jsonl": b'{"task": "lines"}\n',
                          "imatrix.dat": os.urandom(64), "cases.jsonl": b""}.items():
        (other / name).write_bytes(content)
    (other / "checkout").mkdir()


@pytest.fixture(scope="module")
def world(tiny_model, module_tmp: Callable[[str], Path]) -> Iterator[World]:
    root = module_tmp("world")
    model = tiny_model("llama")
    layout = model_layout(model)
    values = torch.exp(0.3 * torch.randn(expected_shape(layout, "head"), generator=torch.Generator().manual_seed(3)))
    save_scales(root / "scales.safetensors", values, layout, "head")
    gguf = convert_to_gguf(model, root / "seal-f32.gguf", "f32", root / "scales.safetensors", progress=False)
    other = convert_to_gguf(tiny_model("gemma3_text"), root / "gemma3-q8_0.gguf", "q8_0", progress=False)
    w = World(root, model, root / "scales.safetensors", gguf, other)
    build_bad_inputs(w)
    before = {p: sha256(p) for p in w.input_files()}
    yield w
    after = {p: sha256(p) for p in w.input_files()}
    assert after == before, "an input changed or appeared: " + ", ".join(
        str(p) for p in set(before) ^ set(after) | {p for p in before if after.get(p) != before[p]})


# -- running a command and judging the result --

def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under folder (hidden ones included) with its content hash."""
    found = {}
    for item in sorted(folder.rglob("*")):
        found[str(item.relative_to(folder))] = sha256(item) if item.is_file() else "folder"
    return found


def refused(w: World, out: Path, args: list[object], names: Path | str, reason: str) -> None:
    """Run the command; check the one-line error and that nothing was written or changed."""
    out.mkdir(exist_ok=True)
    inputs, outputs = w.stats(), snapshot(out)
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(names) in lines[0], f"{names} not named in: {lines[0]}"
    assert re.search(reason, lines[0]), f"{reason!r} not in: {lines[0]}"
    assert "Traceback" not in result.output
    assert snapshot(out) == outputs, "the output folder changed"
    assert w.stats() == inputs, "an input changed"


# -- the matrix: every command x every bad input that applies to it --

def model_args(cmd: str, w: World, model: Path, out: Path) -> list[object]:
    return {
        "fold": ["fold", model, w.scales, "-o", out / "folded", "-q"],
        "fold-and-convert": ["fold-and-convert", model, w.scales, "-o", out / "seal.gguf", "-q"],
        "convert": ["convert", model, "-o", out / "base.gguf", "--outtype", "f32", "-q"],
        "train": ["train", model, "-o", out / "s.safetensors", "--samples", 1, "--length", 300, "--eval-samples", 0,
                  "--device", "cpu", "-q"],
        "eval": ["eval", model, "--scales", w.scales, "--samples", 1, "--lengths", 300, "--max-tokens", 2,
                 "--json", out / "eval.json", "-q"],
        "validate": ["validate", model, w.scales, "--json", out / "validate.json", "-q"],
        "inspect": ["inspect", model],
        "heads": ["heads", model, "-o", out / "heads.csv", "--samples", 1, "--length", 300, "--device", "cpu", "-q"],
        "plan": ["plan", model, "--length", 300, "--max-memory", "cpu=1GiB"],
    }[cmd]


MODEL_COMMANDS = ["fold", "fold-and-convert", "convert", "train", "eval", "validate", "inspect", "heads", "plan"]
# plan reads config.json only: what is wrong with the weights is not its business
CONFIG_ONLY = {"plan": None}
# commands that check the scales against config.json before they read the weights
SCALES_FIRST = ("fold", "fold-and-convert", "eval", "validate")
# breaker -> what the error says; {command: reason} where it differs; None: not an error for it.
MODEL_BREAKERS: dict[str, tuple[str, dict[str, str | None]]] = {
    "model: missing folder": ("no such folder", {"eval": "no such GGUF file or model folder", "inspect": "no such file"}),
    "model: a file": ("expected a model folder", {"eval": "not a GGUF file",
                                                  "inspect": "not a readable safetensors file"}),
    "model: empty folder": ("config.json: missing", {}),
    "model: empty config.json": ("not valid JSON", {}),
    "model: corrupt config.json": ("not valid JSON", {}),
    "model: config.json not an object": ("expected a JSON object", {}),
    "model: config.json without head counts": ("lacks a valid num_hidden_layers", {"inspect": None}),
    "model: unsupported architecture": ("model_type 'gpt2' is not supported",
                                        {"convert": "converter failed", "inspect": None}),
    "model: truncated weights": ("truncated: tensor .* lies past the end of the file", {"inspect": None, **CONFIG_ONLY}),
    "model: corrupt weights": ("corrupt safetensors header", {"inspect": None, **CONFIG_ONLY}),
    "model: empty weights": ("truncated safetensors file", {"inspect": None, **CONFIG_ONLY}),
    "model: pickled weights only": ("holds only pickled weights", {"inspect": None, **CONFIG_ONLY}),
    "model: index lists a missing shard": ("lists shards that are missing", {"inspect": None, **CONFIG_ONLY}),
    "model: config.json has more layers": ("the weights lack model.layers.2.self_attn.o_proj.weight", {
        **dict.fromkeys(SCALES_FIRST, "the model has 3 x 4 x 64"), "inspect": None, **CONFIG_ONLY}),
    "model: config.json has more heads": (r"o_proj.weight has shape \[256, 256\], config.json implies \[\*, 512\]", {
        **dict.fromkeys(SCALES_FIRST, "the model has 2 x 8 x 64"), "inspect": None, **CONFIG_ONLY}),
    "model: already folded": ("already has SEAL scales folded in", {"convert": None, "inspect": None, **CONFIG_ONLY}),
}
# the scales file, not the model, is named where the scales do not fit the model
NAMES_SCALES = {(breaker, c) for c in SCALES_FIRST
                for breaker in ("model: config.json has more layers", "model: config.json has more heads")}

SCALES_COMMANDS = ["fold", "fold-and-convert", "eval", "validate", "inspect"]
SCALES_BREAKERS: dict[str, tuple[str, dict[str, str | None]]] = {
    "scales: missing": ("no such scales file", {"inspect": "no such file"}),
    "scales: a folder": ("expected a scales file, found a folder", {"inspect": None}),
    "scales: empty": ("empty scales file", {"inspect": "empty file"}),
    "scales: random bytes": ("not a readable safetensors file", {}),
    "scales: truncated": ("not a readable safetensors file", {}),
    "scales: NaN": (r"scale at \(1, 2\) is nan; every scale must be finite", {}),
    "scales: inf": (r"scale at \(1, 2\) is inf; every scale must be finite", {}),
    "scales: zero": (r"scale at \(1, 2\) is 0.0; every scale must be > 0", {}),
    "scales: negative": (r"scale at \(1, 2\) is -0.5; every scale must be > 0", {}),
    "scales: float16": ("scales must be float32", {}),
    "scales: shape unlike metadata": (r"tensor shape \(2, 3\) does not match its metadata", {}),
    "scales: channel metadata, head values": (r"does not match its metadata \(channel granularity", {}),
    "scales: unknown granularity": ("granularity 'layer'", {}),
    "scales: other format": ("format 'seal-scales/9'", {}),
    "scales: no metadata": ("metadata lacks format, num_layers", {}),
    "scales: no seal_scales tensor": ("no tensor named 'seal_scales'", {}),
    "scales: zero layers": ("must be positive", {}),
    "scales: counts not integers": ("are not integers", {}),
    "scales: for another model_type": ("scales are for model_type 'mistral'", {"inspect": None}),
    "scales: more layers than the model": ("scales are for .* = 3 x 4 x 64, the model has 2 x 4 x 64", {"inspect": None}),
    "scales: more heads than the model": ("scales are for .* = 2 x 8 x 64", {"inspect": None}),
    "scales: other head_dim": ("scales are for .* = 2 x 4 x 32", {"inspect": None}),
}


def scales_args(cmd: str, w: World, scales: Path, out: Path) -> list[object]:
    return {
        "fold": ["fold", w.model, scales, "-o", out / "folded", "-q"],
        "fold-and-convert": ["fold-and-convert", w.model, scales, "-o", out / "seal.gguf", "--outtype", "q4_k_m", "-q"],
        "eval": ["eval", w.model, "--scales", scales, "--samples", 1, "--lengths", 300, "--json", out / "e.json", "-q"],
        "validate": ["validate", w.model, scales, "--json", out / "v.json", "-q"],
        "inspect": ["inspect", scales],
    }[cmd]


GGUF_COMMANDS = ["chat", "quantize", "import-gguf", "eval", "validate", "validate --base-gguf", "inspect"]
# The header reader (gguffile.header) refuses a broken file first where a command reads it; else the engine.
UNREADABLE = "not a readable GGUF file|"
CANNOT_LOAD = {"chat": UNREADABLE + "llama.cpp cannot load this GGUF", "quantize": UNREADABLE + "llama.cpp's quantizer failed",
               "import-gguf": UNREADABLE + "transformers cannot read this GGUF",
               "eval": UNREADABLE + "transformers cannot load its tokenizer",
               "validate": UNREADABLE + "llama.cpp cannot load this GGUF",
               "validate --base-gguf": UNREADABLE + "llama.cpp cannot load this GGUF",
               "inspect": "not a readable GGUF file"}
GGUF_BREAKERS: dict[str, tuple[str, dict[str, str | None]]] = {
    "gguf: missing": ("no such GGUF file", {"inspect": "no such file"}),
    "gguf: a folder": ("expected a GGUF file, found a folder", {"eval": "config.json: missing",
                                                                 "inspect": "config.json: missing"}),
    "gguf: empty": ("empty GGUF file", {"inspect": "empty file"}),
    "gguf: not a GGUF": ("not a GGUF file", {}),
    "gguf: cut in the header": ("", CANNOT_LOAD),
    "gguf: cut in the metadata": ("", CANNOT_LOAD),
    "gguf: cut in the tensors": ("", CANNOT_LOAD),
    "gguf: unknown architecture": ("", {**CANNOT_LOAD, "quantize": "unknown model architecture: 'zzzzz'",
                                        "import-gguf": "architecture zzzzz is not supported", "inspect": None,
                                        "validate": "its architecture is 'zzzzz'",
                                        "validate --base-gguf": "its architecture is 'zzzzz'"}),
    "gguf: another architecture": ("is not a GGUF of .*its architecture is 'gemma3'", {
        "chat": None, "quantize": None, "import-gguf": None, "eval": None, "inspect": None}),
}


def gguf_args(cmd: str, w: World, gguf: Path, out: Path) -> list[object]:
    return {
        "chat": ["chat", gguf, "--prompt", "hi", "--max-tokens", 2, "-q"],
        "quantize": ["quantize", gguf, out / "q8_0.gguf", "q8_0", "-q"],
        "import-gguf": ["import-gguf", gguf, out / "imported", "-q"],
        "eval": ["eval", gguf, "--samples", 1, "--lengths", 300, "--json", out / "e.json", "-q"],
        "validate": ["validate", w.model, w.scales, gguf, "--json", out / "v.json", "-q"],
        "validate --base-gguf": ["validate", w.model, w.scales, "--base-gguf", gguf, "-q"],
        "inspect": ["inspect", gguf],
    }[cmd]


def matrix() -> list[tuple[str, str, str]]:
    cases = []
    for kind, commands, breakers in (("model", MODEL_COMMANDS, MODEL_BREAKERS),
                                     ("scales", SCALES_COMMANDS, SCALES_BREAKERS),
                                     ("gguf", GGUF_COMMANDS, GGUF_BREAKERS)):
        for breaker, (default, special) in breakers.items():
            for cmd in commands:
                reason = special.get(cmd, default)
                if reason is not None:
                    cases.append((kind, breaker, cmd))
    return cases


BAD_INPUT_CASES = matrix()
ARGS = {"model": model_args, "scales": scales_args, "gguf": gguf_args}
REASONS = {"model": MODEL_BREAKERS, "scales": SCALES_BREAKERS, "gguf": GGUF_BREAKERS}


@pytest.mark.parametrize(("kind", "breaker", "cmd"), BAD_INPUT_CASES,
                         ids=[f"{cmd} <- {breaker}" for _, breaker, cmd in BAD_INPUT_CASES])
def test_bad_input(world: World, tmp_path: Path, kind: str, breaker: str, cmd: str) -> None:
    bad = world.bad[breaker]
    default, special = REASONS[kind][breaker]
    reason = special.get(cmd, default)
    assert reason is not None
    names = world.scales if (breaker, cmd) in NAMES_SCALES else bad
    refused(world, tmp_path / "out", ARGS[kind](cmd, world, bad, tmp_path / "out"), names, reason)


# -- other input files: documents, cases, texts, importance matrices, checkouts --

OTHER_INPUTS: dict[str, tuple[Callable[[World, Path], list[object]], str, str]] = {
    # name: (args, the file named, reason)
    "chat --file missing": (lambda w, o: ["chat", w.gguf, "--file", w.root / "other/absent.txt", "--prompt", "hi"],
                            "other/absent.txt", "no such document"),
    "chat --file a folder": (lambda w, o: ["chat", w.gguf, "--file", w.root / "other/folder.txt", "--prompt", "hi"],
                             "other/folder.txt", "found a folder"),
    "chat --file empty": (lambda w, o: ["chat", w.gguf, "--file", w.root / "other/empty.txt", "--prompt", "hi"],
                          "other/empty.txt", "empty document"),
    "chat --file binary": (lambda w, o: ["chat", w.gguf, "--file", w.root / "other/binary.txt", "--prompt", "hi"],
                           "other/binary.txt", "not a UTF-8 text file"),
    "train --cases missing": (lambda w, o: ["train", w.model, "-o", o / "s.safetensors", "--cases",
                                            w.root / "other/absent.jsonl", "-q"], "other/absent.jsonl", "no such cases file"),
    "train --cases empty": (lambda w, o: ["train", w.model, "-o", o / "s.safetensors", "--cases",
                                          w.root / "other/empty.jsonl", "-q"], "other/empty.jsonl", "empty cases file"),
    "train --cases corrupt": (lambda w, o: ["train", w.model, "-o", o / "s.safetensors", "--cases",
                                            w.root / "other/corrupt.jsonl", "-q"], "other/corrupt.jsonl", "not valid JSON"),
    "train --cases fields": (lambda w, o: ["train", w.model, "-o", o / "s.safetensors", "--cases",
                                           w.root / "other/fields.jsonl", "-q"], "other/fields.jsonl", "missing field"),
    "validate --text missing": (lambda w, o: ["validate", w.model, w.scales, "--text", w.root / "other/absent.txt", "-q"],
                                "other/absent.txt", "no such text file"),
    "validate --text binary": (lambda w, o: ["validate", w.model, w.scales, "--text", w.root / "other/binary.txt", "-q"],
                               "other/binary.txt", "not a UTF-8 text file"),
    "validate --folded missing": (lambda w, o: ["validate", w.model, w.scales, "--folded", w.root / "absent-model", "-q"],
                                  "absent-model", "no such folder"),
    "quantize --imatrix missing": (lambda w, o: ["quantize", w.gguf, o / "q.gguf", "q4_k_m", "--imatrix",
                                                 w.root / "other/absent.dat"], "other/absent.dat",
                                   "no such importance matrix file"),
    "quantize --imatrix garbage": (lambda w, o: ["quantize", w.gguf, o / "q.gguf", "q4_k_m", "--imatrix",
                                                 w.root / "other/imatrix.dat"], "other/imatrix.dat",
                                   "not a readable importance matrix"),
    "fold-and-convert --imatrix garbage": (lambda w, o: ["fold-and-convert", w.model, w.scales, "-o", o / "s.gguf",
                                                         "--outtype", "q4_k_m", "--imatrix", w.root / "other/imatrix.dat"],
                                           "other/imatrix.dat", "not a readable importance matrix"),
    "convert --llama-cpp not a checkout": (lambda w, o: ["convert", w.model, "-o", o / "b.gguf", "--llama-cpp",
                                                         w.root / "other/checkout"], "other/checkout",
                                           "not a llama.cpp checkout"),
}


@pytest.mark.parametrize("case", sorted(OTHER_INPUTS))
def test_other_bad_input(world: World, tmp_path: Path, case: str) -> None:
    make_args, names, reason = OTHER_INPUTS[case]
    out = tmp_path / "out"
    out.mkdir()
    refused(world, out, make_args(world, out), names, reason)


# -- outputs: existing, of the wrong kind, an input, in a missing folder --

def output_args(cmd: str, w: World, out: Path) -> list[object]:
    """The command writing `out` (a file or, for fold / import-gguf / demo, a folder)."""
    return {
        "fold": ["fold", w.model, w.scales, "-o", out, "-q"],
        "import-gguf": ["import-gguf", w.gguf, out, "-q"],
        "convert": ["convert", w.model, "-o", out, "--outtype", "f32", "-q"],
        "fold-and-convert": ["fold-and-convert", w.model, w.scales, "-o", out, "-q"],
        "quantize": ["quantize", w.gguf, out, "q8_0", "-q"],
        "train": ["train", w.model, "-o", out, "--samples", 1, "--length", 300, "--eval-samples", 0, "-q"],
        "train --save-cases": ["train", w.model, "-o", out.parent / "other.safetensors", "--save-cases", out,
                               "--samples", 1, "--length", 300, "--eval-samples", 0, "-q"],
        "eval --json": ["eval", w.model, "--samples", 1, "--lengths", 300, "--json", out, "-q"],
        "eval --plot": ["eval", w.model, "--samples", 1, "--lengths", 300, "--plot", out, "-q"],
        "validate --json": ["validate", w.model, w.scales, "--json", out, "-q"],
        "demo": ["demo", "--quick", "--train", "-o", out, "-q"],
        "heads": ["heads", w.model, "-o", out, "--samples", 1, "--length", 300, "-q"],
        "heads --plot": ["heads", w.model, "-o", out.parent / "other.csv", "--plot", out, "--samples", 1,
                         "--length", 300, "-q"],
        "inspect --plot": ["inspect", w.scales, "--plot", out],
        "plan --write-device-map": ["plan", w.model, "--write-device-map", out],
    }[cmd]


FOLDER_OUTPUTS = {"fold", "import-gguf", "demo"}
OUTPUT_COMMANDS = ["fold", "import-gguf", "convert", "fold-and-convert", "quantize", "train", "train --save-cases",
                   "eval --json", "eval --plot", "validate --json", "demo", "heads", "heads --plot", "inspect --plot",
                   "plan --write-device-map"]
PLOT_OUTPUTS = {"eval --plot", "heads --plot", "inspect --plot"}


def out_name(cmd: str) -> str:
    return "out" if cmd in FOLDER_OUTPUTS else "out.png" if cmd in PLOT_OUTPUTS else "out.file"


@pytest.mark.parametrize("cmd", OUTPUT_COMMANDS)
def test_existing_output_refused_without_force(world: World, tmp_path: Path, cmd: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / out_name(cmd)
    if cmd in FOLDER_OUTPUTS:
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    else:
        target.write_text("mine")
    refused(world, out, output_args(cmd, world, target), target, r"already exists \(use --force to replace it\)")


@pytest.mark.parametrize("cmd", [c for c in OUTPUT_COMMANDS if c not in ("convert", "fold-and-convert")])
def test_output_of_the_wrong_kind_refused_even_with_force(world: World, tmp_path: Path, cmd: str) -> None:
    """--force replaces an old output, never a folder by a file or a file by a folder. (convert and
    fold-and-convert take an existing folder for -o, to write MODEL[-seal]-TYPE.gguf in: test_outtypes.)"""
    out = tmp_path / "out"
    out.mkdir()
    target = out / out_name(cmd)
    if cmd in FOLDER_OUTPUTS:
        target.write_text("mine")
        reason = "is a file; give the path of the folder to write"
    else:
        target.mkdir()
        (target / "keep.txt").write_text("mine")
        reason = "is a folder; give the path of the file to write"
    refused(world, out, [*output_args(cmd, world, target), "--force"], target, reason)


@pytest.mark.parametrize("cmd", OUTPUT_COMMANDS)
def test_output_folder_missing(world: World, tmp_path: Path, cmd: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "no-such-folder" / out_name(cmd)
    refused(world, out, output_args(cmd, world, target), target.parent, "output folder does not exist")


INPUT_AS_OUTPUT: dict[str, Callable[[World], tuple[list[object], Path]]] = {
    "fold -o MODEL": lambda w: (["fold", w.model, w.scales, "-o", w.model], w.model),
    "fold-and-convert -o SCALES": lambda w: (["fold-and-convert", w.model, w.scales, "-o", w.scales], w.scales),
    "quantize IN IN": lambda w: (["quantize", w.gguf, w.gguf, "q8_0"], w.gguf),
    "import-gguf GGUF GGUF": lambda w: (["import-gguf", w.gguf, w.gguf], w.gguf),
    "eval --json GGUF": lambda w: (["eval", w.gguf, "--samples", 1, "--json", w.gguf], w.gguf),
    "validate --json SCALES": lambda w: (["validate", w.model, w.scales, "--json", w.scales], w.scales),
    "train -o CASES --cases CASES": lambda w: (
        ["train", w.model, "-o", w.root / "other/cases.jsonl", "--cases", w.root / "other/cases.jsonl"],
        w.root / "other/cases.jsonl"),
}


@pytest.mark.parametrize("case", sorted(INPUT_AS_OUTPUT))
def test_input_as_output_refused_even_with_force(world: World, tmp_path: Path, case: str) -> None:
    args, named = INPUT_AS_OUTPUT[case](world)
    reason = "is a file; give the path of the folder" if case.startswith("import-gguf") else "is also an input"
    refused(world, tmp_path / "out", [*args, "--force"], named, reason)


# -- already folded --

def test_import_of_a_folded_gguf_cannot_be_folded_again(world: World, tmp_path: Path) -> None:
    imported = import_gguf(world.gguf, tmp_path / "imported", progress=False)
    record = json.loads((imported / "config.json").read_text())["seal_fold"]
    assert record["scales_sha256"] == sha256(world.scales) and record["granularity"] == "head"
    out = tmp_path / "out"
    for args in (["fold", imported, world.scales, "-o", out / "twice", "-q"],
                 ["fold-and-convert", imported, world.scales, "-o", out / "twice.gguf", "-q"],
                 ["eval", imported, "--scales", world.scales, "--samples", 1, "-q"]):
        refused(world, out, args, imported, "already has SEAL scales folded in")


# -- a refusing disk: read-only folder, full disk, file size limit --

def unprivileged() -> list[str]:
    """A command prefix under which folder permissions hold: root keeps its uid but loses the
    capabilities that bypass them (the interpreter lives in root's home, out of reach of other uids)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def run_cli(args: list[object], prefix: list[str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or []), SEAL_GGUF, *[str(a) for a in args]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_read_only_output_folder(world: World, tmp_path: Path) -> None:
    prefix = unprivileged()
    locked = tmp_path / "locked"
    locked.mkdir()
    commands = ["fold", "import-gguf", "convert", "quantize", "train", "eval --json", "validate --json"]
    targets = {cmd: locked / f"{i}-{out_name(cmd)}" for i, cmd in enumerate(commands)}
    inputs = world.stats()
    locked.chmod(0o555)
    try:
        # one process per command, all at once: each pays the interpreter's start-up
        procs = {cmd: run_cli(output_args(cmd, world, targets[cmd]), prefix) for cmd in commands}
        for cmd, proc in procs.items():
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 1, (cmd, stderr)
            line = one_line(stderr)
            assert line == f"Error: {locked}: output folder is not writable", (cmd, line)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
    assert world.stats() == inputs


@pytest.fixture()
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs filled to the last byte (needs root and mount; skipped elsewhere)."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        with open(mount_point / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield mount_point
        assert os.listdir(mount_point) == ["filler"], "something was left on the full disk"
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


FULL_DISK = {
    # the writers: fold streams shards; the converter and the quantizer are llama.cpp's (no errno in their
    # message); transformers writes the import; safetensors the scales; json and matplotlib the reports
    "fold": lambda w, o: ["fold", w.model, w.scales, "-o", o / "folded", "-q"],
    "convert f32": lambda w, o: ["convert", w.model, "-o", o / "base.gguf", "--outtype", "f32", "-q"],
    "fold-and-convert q4_k_m": lambda w, o: ["fold-and-convert", w.model, w.scales, "-o", o / "seal.gguf",
                                             "--outtype", "q4_k_m", "-q"],
    "quantize": lambda w, o: ["quantize", w.gguf, o / "q8_0.gguf", "q8_0", "-q"],
    "import-gguf": lambda w, o: ["import-gguf", w.gguf, o / "imported", "-q"],
    "train": lambda w, o: ["train", w.model, "-o", o / "s.safetensors", "--samples", 1, "--length", 300,
                           "--eval-samples", 0, "--device", "cpu", "-q"],
    "eval --json --plot": lambda w, o: ["eval", w.model, "--samples", 1, "--lengths", 300, "--max-tokens", 2,
                                        "--json", o / "e.json", "--plot", o / "e.png", "-q"],
}


@pytest.mark.parametrize("cmd", sorted(FULL_DISK))
def test_full_disk(world: World, full_disk: Path, cmd: str) -> None:
    inputs = world.stats()
    result = CliRunner().invoke(cli, [str(a) for a in FULL_DISK[cmd](world, full_disk)], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    # transformers' GGUF dequantization bar is a bare tqdm that -q cannot reach
    line = one_line("\n".join(x for x in result.stderr.splitlines() if "de-quantizing GGUF tensors" not in x))
    assert str(full_disk) in line and "writing failed" in line and "free some space" in line, line
    assert world.stats() == inputs


def test_file_size_limit(world: World, tmp_path: Path) -> None:
    """RLIMIT_FSIZE (as on a filesystem that caps file size): the write fails with EFBIG, not a signal."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "out"
    out.mkdir()
    inputs = world.stats()
    proc = run_cli(["fold", world.model, world.scales, "-o", out / "folded", "-q"], preexec_fn=limit)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert one_line(stderr) == (f"Error: {out / 'folded'}: writing failed (File too large); "
                                "choose a folder on a filesystem that takes files this large")
    assert list(out.iterdir()) == []
    assert world.stats() == inputs


# -- Ctrl-C in the middle of a write --

def partial_output(folder: Path) -> int:
    """Bytes written so far into hidden temporary outputs in folder (0: none has data yet)."""
    total = 0
    for item in folder.iterdir():
        if item.name.startswith("."):
            files = [item] if item.is_file() else [p for p in item.rglob("*") if p.is_file()]
            total += sum(p.stat().st_size for p in files)
    return total


INTERRUPTIBLE = {
    # fold streams a 100 MB shard; fold-and-convert runs the converter into an intermediate beside the output
    "fold": lambda w, o: ["fold", w.model, w.scales, "-o", o / "folded", "-q"],
    "fold-and-convert q4_k_m": lambda w, o: ["fold-and-convert", w.model, w.scales, "-o", o / "seal.gguf",
                                             "--outtype", "q4_k_m", "-q"],
}


@pytest.mark.parametrize("cmd", sorted(INTERRUPTIBLE))
def test_ctrl_c_in_the_middle_of_a_write(world: World, tmp_path: Path, cmd: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inputs = world.stats()
    # the whole process group gets SIGINT, as from a terminal's Ctrl-C; it is frozen (SIGSTOP) the
    # moment its partial output has data, so that the interrupt lands in the middle of the write
    proc = run_cli(INTERRUPTIBLE[cmd](world, out), start_new_session=True, preexec_fn=default_sigint)
    written = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        # look only while the group is stopped, so the write cannot finish between look and interrupt
        os.killpg(proc.pid, signal.SIGSTOP)
        written = partial_output(out)
        if written:
            os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGCONT)
        if written:
            break
        time.sleep(0.001)
    _, stderr = proc.communicate(timeout=120)
    assert written > 0, f"the command ended before writing anything: {stderr}"
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "Interrupted; no partial output was left behind."
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []
    assert world.stats() == inputs


# -- --debug --

def test_debug_shows_the_traceback(world: World, tmp_path: Path) -> None:
    args = ["fold", world.bad["model: truncated weights"], world.scales, "-o", tmp_path / "folded"]
    quiet = CliRunner().invoke(cli, [str(a) for a in args])
    loud = CliRunner().invoke(cli, ["--debug", *[str(a) for a in args]])
    assert quiet.exit_code == loud.exit_code == 1
    assert "Traceback" not in quiet.stderr and "Traceback (most recent call last)" in loud.stderr
    assert "seal_gguf/model/checkpoint.py" in loud.stderr and "InputError" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()
    assert list(tmp_path.iterdir()) == []

