"""Split GGUFs: llama.cpp's parts written by split_gguf and --split-max-size, read by fold-gguf and import-gguf.

Every split is checked the way it is used: llama.cpp loads the first part and gives the unsplit
file's logits, bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, Keys
from helpers import llama_cpp_logits, logits, one_line_error, random_scales, tensors_gguf

import seal_gguf.gguffile.split as split_module
from seal_gguf.cli.app import cli
from seal_gguf.constants import GGUFKeys
from seal_gguf.convert.from_gguf import import_gguf
from seal_gguf.convert.quantize import quantize as quantize_gguf
from seal_gguf.convert.to_gguf import convert_to_gguf
from seal_gguf.errors import InputError, OutputExistsError
from seal_gguf.fileio import atomic_dir, atomic_file
from seal_gguf.fold.gguf import fold_gguf
from seal_gguf.gguffile.header import read_gguf_header
from seal_gguf.gguffile.metadata import read_gguf_facts
from seal_gguf.gguffile.split import gguf_output, parse_split_size, single_gguf, split_gguf
from seal_gguf.ship.chat import ChatSession

IDS = [1, 200, 300, 400, 500]
SPLIT_KEYS = (Keys.Split.LLM_KV_SPLIT_NO, Keys.Split.LLM_KV_SPLIT_COUNT, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT)


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def base(model: Path, module_tmp: Callable[[str], Path]) -> Path:
    """The tiny llama as an f32 GGUF from llama.cpp's converter: a 50 MB token_embd, then 1 MB or less each."""
    return convert_to_gguf(model, module_tmp("base") / "model.gguf", "f32", progress=False)


@pytest.fixture(scope="module")
def parts(base: Path, module_tmp: Callable[[str], Path]) -> list[Path]:
    return list(split_gguf(base, module_tmp("split") / "model.gguf", 2_000_000, progress=False).paths)


@pytest.fixture(scope="module")
def scales(model: Path, module_tmp: Callable[[str], Path]) -> Path:
    path = module_tmp("scales") / "head.safetensors"
    random_scales(path, model, "head")
    return path


def tensor_data(paths: list[Path]) -> dict[str, bytes]:
    """Every tensor's bytes, over all parts, in order."""
    out = {}
    for path in paths:
        header, _ = read_gguf_header(path)
        data = path.read_bytes()
        for name, info in header.tensors.items():
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.raw_type)]
            start = header.data_offset + info.offset
            out[name] = data[start:start + int(np.prod(info.dims)) // block * size]
    return out


def kv_bytes(path: Path) -> dict[str, bytes]:
    header, raw = read_gguf_header(path)
    return {key: raw[e.start:e.end] for key, e in header.kv.items()}


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(args: list[object], match: str, folder: Path, inputs: list[Path]) -> None:
    """One line on stderr, exit 1, nothing new in folder, the inputs unchanged."""
    before = {p: p.read_bytes() for p in inputs}
    listing = sorted(folder.iterdir())
    result = invoke(*args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], \
        result.output
    assert sorted(folder.iterdir()) == listing
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.unit
def test_sizes_as_llama_cpp_spells_them() -> None:
    assert [parse_split_size(s) for s in ("4G", "500M", "100K", "123", "2g")] == [
        4_000_000_000, 500_000_000, 100_000, 123, 2_000_000_000]
    for bad in ("4GB", "1.5G", "-1", "0", "0G", "", "G"):
        with pytest.raises(InputError, match="split size"):
            parse_split_size(bad)
    result = invoke("fold-gguf", "a.gguf", "s.safetensors", "-o", "o.gguf", "--split-max-size", "4GB")
    assert result.exit_code == 2 and "expected a number of bytes, optionally followed by K, M or G" in result.output


def four_tensors(path: Path) -> Path:
    """A GGUF of four 4 KB tensors: split at 5000 bytes, four parts; at 9000, two."""
    return tensors_gguf(path, {f"blk.{i}.ffn_up.weight": (8, 128) for i in range(4)})


def write_gguf(source: Path, out: Path, split_max_size: int | None, force: bool = False,
               inputs: list[Path] = ()) -> tuple[Path, ...]:
    """`source` written to `out` the way convert and quantize write their GGUF (gguf_output)."""
    with gguf_output(out, split_max_size, force=force, progress=False, inputs=inputs) as pending:
        shutil.copy(source, pending.path)
    return pending.written


@pytest.mark.unit
def test_outputs_get_the_usual_mode(tmp_path: Path) -> None:
    """Outputs get the mode open() gives a new file (0666 & ~umask; folders 0777), not the temporary file's 0600."""
    source = four_tensors(tmp_path / "source.gguf")
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(0o027)
    try:
        with atomic_file(out / "file.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(out / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
        written = [*write_gguf(source, out / "plain.gguf", None), *write_gguf(source, out / "split.gguf", 5000)]
    finally:
        os.umask(old)
    assert len(written) == 5
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*out.iterdir(), out / "folder" / "inside.txt"]}
    assert modes == {**{p.name: 0o640 for p in [out / "file.txt", out / "inside.txt", *written]}, "folder": 0o750}


@pytest.mark.unit
def test_force_replaces_what_an_earlier_run_left_under_the_name(tmp_path: Path) -> None:
    """A split set of another count, or the plain file a set replaces (and the reverse), is refused without --force
    and removed with it, once the new output is complete; other names, and the inputs, are never touched."""
    source = four_tensors(tmp_path / "source.gguf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    others = [out_dir / name for name in ("m-q8_0-00001-of-00002.gguf", "xm-00001-of-00002.gguf", "m.gguf.bak",
                                          "m-00001-of-00002.gguf.tmp", "m-1-of-2.gguf")]
    for other in others:
        other.write_bytes(b"not ours")

    def left() -> list[str]:
        return sorted(p.name for p in out_dir.iterdir() if p not in others)

    four = write_gguf(source, out, 5000)
    assert left() == [f"m-0000{k}-of-00004.gguf" for k in range(1, 5)] == [p.name for p in four]
    for size in (None, 9000):
        with pytest.raises(OutputExistsError, match="m-00001-of-00004.gguf exists .a part of an earlier split"):
            write_gguf(source, out, size)
    with pytest.raises(RuntimeError), gguf_output(out, 9000, force=True, progress=False) as pending:
        shutil.copy(source, pending.path)
        raise RuntimeError("the new output fails: the old one stays")
    assert left() == [p.name for p in four]
    for size, names in ((9000, ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]), (None, ["m.gguf"]),
                        (5000, [p.name for p in four])):
        written = write_gguf(source, out, size, force=True)
        assert left() == [p.name for p in written] == names
    # parts of the name that are being read (quantize given the first part): a new set of that name leaves them
    inputs = write_gguf(source, out_dir / "in.gguf", 5000)
    kept = write_gguf(source, out_dir / "in.gguf", 9000, force=True, inputs=[inputs[0]])
    assert sorted(p.name for p in out_dir.glob("in*")) == sorted(p.name for p in (*inputs, *kept))
    assert all(other.read_bytes() == b"not ours" for other in others)


def test_parts_load_in_llama_cpp(base: Path, parts: list[Path]) -> None:
    n = len(parts)
    assert n > 2 and [p.name for p in parts] == [f"model-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    # the tensors, byte for byte and in order; all metadata in the first part, only split.* in the others
    assert list(tensor_data(parts).items()) == list(tensor_data([base]).items())
    assert {k: v for k, v in kv_bytes(parts[0]).items() if k not in SPLIT_KEYS} == kv_bytes(base)
    assert all(set(kv_bytes(p)) == set(SPLIT_KEYS) for p in parts[1:])
    last = GGUFReader(parts[-1])  # no vocabulary in this part: quick to read with gguf-py
    assert {k: (f.types, f.contents()) for k, f in last.fields.items() if k.startswith("split.")} == {
        Keys.Split.LLM_KV_SPLIT_NO: ([GGUFValueType.UINT16], n - 1),
        Keys.Split.LLM_KV_SPLIT_COUNT: ([GGUFValueType.UINT16], n),
        Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT: ([GGUFValueType.INT32], len(read_gguf_header(base)[0].tensors))}
    assert np.array_equal(llama_cpp_logits(parts[0], IDS), llama_cpp_logits(base, IDS))
    with single_gguf(parts[0], parts[0].parent, progress=False) as merged:  # what import-gguf reads
        assert merged.read_bytes() == base.read_bytes()
    assert sorted(parts[0].parent.iterdir()) == parts


def test_tensors_larger_than_the_size_and_a_model_that_fits(base: Path, tmp_path: Path) -> None:
    tiny = split_gguf(base, tmp_path / "tiny.gguf", 1, progress=False)  # one tensor per part
    count = len(read_gguf_header(base)[0].tensors)
    assert len(tiny.paths) == count and all(len(read_gguf_header(p)[0].tensors) == 1 for p in tiny.paths)
    assert tiny.warnings == (f"{count} tensors are larger than the split size of 1 bytes, output.weight (50.3 MB), "
                             "token_embd.weight (50.3 MB), blk.0.ffn_down.weight (524.3 KB) and "
                             f"{count - 3} more: each gets a part of its own, larger than that size (as llama.cpp "
                             "splits)",)
    assert np.array_equal(llama_cpp_logits(tiny.paths[0], IDS), llama_cpp_logits(base, IDS))
    whole = split_gguf(base, tmp_path / "whole.gguf", parse_split_size("4G"), progress=False)
    assert whole.paths == (tmp_path / "whole.gguf",) and whole.paths[0].read_bytes() == base.read_bytes()
    assert whole.warnings == ("the model fits in one part of 4.0 GB: written as one GGUF, not split",)


def test_fold_gguf_reads_and_writes_parts(base: Path, parts: list[Path], scales: Path, tmp_path: Path) -> None:
    single = fold_gguf(base, scales, tmp_path / "single.gguf", progress=False).out_path
    result = invoke("fold-gguf", parts[0], scales, "-o", tmp_path / "folded.gguf", "-q")
    assert result.exit_code == 0, result.output
    n = len(parts)
    folded = [tmp_path / f"folded-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    assert f"into {folded[0]} … {folded[-1].name} ({n} parts, " in result.output
    # the same parts, each holding what the input's part held, folded as the unsplit GGUF is
    assert [list(read_gguf_header(p)[0].tensors) for p in folded] == [list(read_gguf_header(p)[0].tensors)
                                                                       for p in parts]
    assert tensor_data(folded) == tensor_data([single])
    seal = {k: v for k, v in read_gguf_header(folded[0])[0].kv.items() if k.startswith("seal.")}
    assert seal[GGUFKeys.SOURCE_GGUF_SHA256].value == hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    assert seal.keys() == {k for k in read_gguf_header(single)[0].kv if k.startswith("seal.")}
    assert np.array_equal(llama_cpp_logits(folded[0], IDS), llama_cpp_logits(single, IDS))
    # the card names the first part as such and gives the size of all the parts
    card = invoke("card", folded[0], "-o", tmp_path / "card.md")
    assert card.exit_code == 0, card.output
    text = (tmp_path / "card.md").read_text(encoding="utf-8")
    assert f"`{folded[0].name}` (first of {n} parts, loaded together)" in text
    assert f"{sum(p.stat().st_size for p in folded) / 1e6:.1f} MB" in text
    (tmp_path / "card.md").unlink()
    # --split-max-size: the unsplit GGUF folded into parts of its own size
    result = invoke("fold-gguf", base, scales, "-o", tmp_path / "resplit.gguf", "--split-max-size", "1M", "-q")
    assert result.exit_code == 0, result.output
    resplit = sorted(tmp_path.glob("resplit-*.gguf"))
    assert len(resplit) > n and tensor_data(resplit) == tensor_data([single])
    assert np.array_equal(llama_cpp_logits(resplit[0], IDS), llama_cpp_logits(single, IDS))
    # --force without a split size: one file, and the set it replaces is gone
    result = invoke("fold-gguf", base, scales, "-o", tmp_path / "resplit.gguf", "--force", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(tmp_path.glob("resplit*")) == [tmp_path / "resplit.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_parts_refused(base: Path, parts: list[Path], scales: Path, tmp_path: Path) -> None:
    n = len(parts)
    out = tmp_path / "out.gguf"
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for part in parts[:1] + parts[2:]:
        shutil.copy(part, incomplete / part.name)
    first = incomplete / parts[0].name
    refused(["fold-gguf", first, scales, "-o", out], f"part 2 of {n} of this split GGUF, {parts[1].name}, is missing",
            tmp_path, [first])
    refused(["import-gguf", first, tmp_path / "imported"], "is missing", tmp_path, [first])
    refused(["fold-gguf", parts[1], scales, "-o", out], f"part 2 of {n} of a split GGUF; give the first part, "
            f"{parts[0].name}", tmp_path, parts)
    # part 2 of another split of the same model, in place of the missing one
    (tmp_path / "other").mkdir()
    other = split_gguf(base, tmp_path / "other" / "model.gguf", 1, progress=False)
    shutil.copy(other.paths[1], incomplete / parts[1].name)
    refused(["fold-gguf", first, scales, "-o", out], f"says it is part 2 of {len(other.paths)}, expected part 2 of {n}: "
            "the parts are from different splits", tmp_path, [first])
    renamed = incomplete / "renamed.gguf"
    shutil.copy(first, renamed)
    refused(["fold-gguf", renamed, scales, "-o", out], f"but not named renamed-00001-of-{n:05d}.gguf", tmp_path,
            [renamed])
    # an existing part of the output: nothing written unless --force
    (tmp_path / f"out-00002-of-{n:05d}.gguf").write_bytes(b"old")
    refused(["fold-gguf", parts[0], scales, "-o", out], "already exists (use --force", tmp_path, parts)


@pytest.mark.parametrize("command", [
    ["chat", "{part}", "--prompt", "hi"],
    ["inspect", "{part}"],
    ["card", "{part}", "-o", "{tmp}/card.md"],
    ["ollama", "{part}", "-o", "{tmp}/Modelfile"],
    ["serve", "{part}"],
    ["eval", "{part}", "--samples", "1"],
    ["quantize", "{part}", "{tmp}/out.gguf", "q8_0"],
    ["import-gguf", "{part}", "{tmp}/imported"],
], ids=lambda command: command[0])
def test_a_later_part_is_refused_by_name(parts: list[Path], command: list[str], tmp_path: Path) -> None:
    """llama.cpp loads a split GGUF from its first part, which holds the metadata: given another, every
    command that reads a GGUF as a model says which to give instead (not that the file has no architecture,
    chat template or SEAL keys, nor that llama.cpp failed), and writes nothing."""
    n = len(parts)
    args = [arg.format(part=parts[1], tmp=tmp_path) for arg in command]
    one_line_error(invoke(*args), f"{parts[1]}: part 2 of {n} of a split GGUF; give the first part, {parts[0].name}")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=f"part 3 of {n} of a split GGUF"):
        ChatSession(parts[2])


@pytest.mark.parametrize("command", [
    ["inspect", "{part}"],
    ["card", "{part}", "-o", "{tmp}/card.md"],
    ["ollama", "{part}", "-o", "{tmp}/Modelfile"],
    ["eval", "{part}", "--samples", "1"],
    ["quantize", "{part}", "{tmp}/out.gguf", "q8_0"],
], ids=lambda command: command[0])
def test_a_first_part_without_its_parts_is_refused(parts: list[Path], command: list[str], tmp_path: Path) -> None:
    """Every command that reads a split GGUF checks all its parts before any work, in seal-gguf's words."""
    lone = tmp_path / "lone"
    lone.mkdir()
    first = Path(shutil.copy(parts[0], lone / parts[0].name))
    args = [arg.format(part=first, tmp=tmp_path) for arg in command]
    one_line_error(invoke(*args), f"part 2 of {len(parts)} of this split GGUF, {parts[1].name}, is missing")
    assert sorted(tmp_path.iterdir()) == [lone] and list(lone.iterdir()) == [first]


def test_a_renamed_later_part_names_no_missing_file(parts: list[Path], tmp_path: Path) -> None:
    renamed = Path(shutil.copy(parts[1], tmp_path / "second.gguf"))
    one_line_error(invoke("inspect", renamed), f"part 2 of {len(parts)} of a split GGUF, renamed; give the first part",
                   f"NAME-00001-of-{len(parts):05d}.gguf")


def test_ollama_refuses_a_split_gguf_and_inspect_and_card_count_its_parts(parts: list[Path], tmp_path: Path) -> None:
    """Ollama imports one GGUF file (ollama/ollama#5245): no Modelfile for a split one. inspect and the card
    say the file is the first of N parts, and the card gives the size of them all."""
    n = len(parts)
    one_line_error(invoke("ollama", parts[0], "-o", tmp_path / "Modelfile"),
                   f"the first of {n} parts of a split GGUF; Ollama imports one GGUF file")
    assert not (tmp_path / "Modelfile").exists()
    result = invoke("inspect", parts[0])
    assert result.exit_code == 0 and f"GGUF (first of {n} parts)" in result.output, result.output
    facts = read_gguf_facts(parts[0])
    assert facts.parts == n and facts.size == sum(p.stat().st_size for p in parts)


def test_interrupt_leaves_no_part(base: Path, scales: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copied = []
    real_copy = split_module.copy_range

    def interrupted(*args, **kwargs) -> None:  # Ctrl-C after some parts are complete
        copied.append(1)
        if len(copied) == 10:
            raise KeyboardInterrupt
        real_copy(*args, **kwargs)

    monkeypatch.setattr(split_module, "copy_range", interrupted)
    for run in (lambda: split_gguf(base, tmp_path / "s.gguf", 1, progress=False),
                lambda: fold_gguf(base, scales, tmp_path / "f.gguf", progress=False, split_max_size=1)):
        copied.clear()
        with pytest.raises(KeyboardInterrupt):
            run()
        assert list(tmp_path.iterdir()) == []


def test_import_gguf_reads_every_part(model: Path, parts: list[Path], tmp_path: Path) -> None:
    out = import_gguf(parts[0], tmp_path / "imported", progress=False)
    ids = torch.tensor([IDS])
    assert torch.allclose(logits(out, ids), logits(model, ids), atol=1e-4, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["imported"]  # the merged copy is gone


def test_convert_and_quantize_write_parts(model: Path, base: Path, tmp_path: Path) -> None:
    """--split-max-size on convert (several types) and quantize: each output's parts load in llama.cpp with
    the unsplit file's logits; parts left by an earlier run are refused before any work unless --force."""
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("convert", model, "-o", out / "m-{type}.gguf", "--outtype", "f16,q8_0", "--split-max-size", "2M",
                    "-q")
    assert result.exit_code == 0, result.output
    for qtype in ("f16", "q8_0"):
        written = sorted(out.glob(f"m-{qtype}-*-of-*.gguf"))
        first = written[0]
        assert first.name.startswith(f"m-{qtype}-00001-of-") and not (out / f"m-{qtype}.gguf").exists()
        size = sum(p.stat().st_size for p in written) / 1e6
        assert f"Wrote {first} … {written[-1].name} ({qtype}, {len(written)} parts, {size:.1f} MB) in " in result.output
        whole = convert_to_gguf(model, tmp_path / f"whole-{qtype}.gguf", qtype, progress=False)
        assert np.array_equal(llama_cpp_logits(first, IDS), llama_cpp_logits(whole, IDS))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary left
    refused(["convert", model, "-o", out / "m-{type}.gguf", "--outtype", "f16,q8_0", "--split-max-size", "2M"],
            "a part of an earlier split output", out, [])
    (tmp_path / "q").mkdir()
    quantized = quantize_gguf(base, tmp_path / "q" / "m.gguf", "q8_0", split_max_size=2_000_000, progress=False)
    assert quantized.name == f"m-00001-of-{quantized.name[-10:-5]}.gguf"
    unsplit = quantize_gguf(base, tmp_path / "m-q8_0.gguf", "q8_0", progress=False)
    assert np.array_equal(llama_cpp_logits(quantized, IDS), llama_cpp_logits(unsplit, IDS))
