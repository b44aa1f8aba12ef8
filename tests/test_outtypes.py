"""Several types in one run (convert once, quantize each type) and llama-quantize's per-tensor types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFWriter, LlamaFileType
from helpers import one_line_error, random_scales, tensors_gguf

import seal_gguf.convert.to_gguf as convert_module
from seal_gguf.cli.app import cli
from seal_gguf.constants import GGUFKeys
from seal_gguf.convert.quantize import (
    ATTN_OUTPUT_PATTERN,
    TensorTypes,
    parse_tensor_types,
    warn_unmatched_patterns,
)
from seal_gguf.convert.to_gguf import convert_to_gguf, convert_to_ggufs, output_paths, split_outtypes
from seal_gguf.errors import InputError

SET = ("q4_k_m", "q8_0", "f32")  # a k-quant mixture, a type the converter also writes, the intermediate itself


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def scales(llama: Path, module_tmp: Callable[[str], Path]) -> Path:
    path = module_tmp("scales") / "head.safetensors"
    random_scales(path, llama, "head")
    return path


@pytest.fixture(scope="module")
def singles(llama: Path, scales: Path, converter: Path, module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    """Each type of SET by its own fold-and-convert run, as before sets existed."""
    folder = module_tmp("singles")
    return {t: convert_to_gguf(llama, folder / f"{t}.gguf", t, scales, progress=False) for t in SET}


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(str(path), "r").tensors}


def types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path), "r").tensors}


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- naming and checks before any work --

@pytest.mark.unit
def test_outtypes_and_output_names(tmp_path: Path) -> None:
    assert split_outtypes("Q4_K_M, q8_0") == ["q4_k_m", "q8_0"]
    for bad, match in (("q4_k_m,,q8_0", "an empty type"), ("q8_0,Q8_0", "q8_0 is given twice")):
        with pytest.raises(InputError, match=match):
            split_outtypes(bad)
    model = tmp_path / "smol"
    assert output_paths(["q8_0"], tmp_path / "x.gguf", model, folded=True) == {"q8_0": tmp_path / "x.gguf"}
    assert output_paths(["q4_0", "q8_0"], tmp_path, model, folded=True) == {
        "q4_0": tmp_path / "smol-seal-q4_0.gguf", "q8_0": tmp_path / "smol-seal-q8_0.gguf"}
    assert output_paths(["q4_0", "q8_0"], tmp_path / "b-{type}.gguf", model, folded=False) == {
        "q4_0": tmp_path / "b-q4_0.gguf", "q8_0": tmp_path / "b-q8_0.gguf"}
    with pytest.raises(InputError, match="an existing folder or a file name with {type}"):
        output_paths(["q4_0", "q8_0"], tmp_path / "one.gguf", model, folded=False)
    # one type: an existing folder too, the file named as for several
    assert output_paths(["q8_0"], tmp_path, model, folded=False) == {"q8_0": tmp_path / "smol-q8_0.gguf"}
    assert output_paths(["q8_0"], f"{tmp_path}/", model, folded=True) == {"q8_0": tmp_path / "smol-seal-q8_0.gguf"}
    for outtypes in (["q8_0"], ["q4_0", "q8_0"]):  # a trailing separator says "a folder", which must exist
        with pytest.raises(InputError, match="new/: output folder does not exist"):
            output_paths(outtypes, f"{tmp_path}/new/", model, folded=False)


@pytest.mark.unit
def test_a_pattern_that_matches_no_tensor_is_said(tmp_path: Path) -> None:
    """llama-quantize applies a --tensor-type pattern that names no tensor to nothing, silently; here a warning
    names it. Only the tensors the quantizer quantizes count (2-D and up: not the norms)."""
    gguf = tensors_gguf(tmp_path / "m.gguf", {"blk.0.attn_v.weight": (8, 32), "blk.0.attn_norm.weight": (32,)})
    said: list[str] = []
    warn_unmatched_patterns(gguf, parse_tensor_types(["attn_v=q8_0", "attn_vv=q8_0", "norm=f16"]), said.append)
    assert said == [f"--tensor-type '{pattern}' matches none of the model's 1 tensors that llama.cpp quantizes: it "
                    "changes nothing (the GGUF names them like blk.0.attn_v.weight)" for pattern in ("attn_vv=q8_0",
                                                                                                     "norm=f16")]


@pytest.mark.unit
def test_tensor_types_parsed_as_llama_quantize() -> None:
    types_ = parse_tensor_types(["Attn_V=Q8_0", r"blk\.[01]\.ffn_down=q6_k", "ffn=q5_0"], attn_output_type="f16",
                                output_tensor_type="q6_k", token_embedding_type="q4_k")
    assert types_.overrides == ((ATTN_OUTPUT_PATTERN, "f16"), ("attn_v", "q8_0"), (r"blk\.[01]\.ffn_down", "q6_k"),
                                ("ffn", "q5_0"))
    asked = {name: types_.asked(name, "q4_k_m", tied=False) for name in (
        "blk.0.attn_output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight", "blk.2.ffn_down.weight",
        "blk.0.attn_q.weight", "output.weight", "token_embd.weight")}
    assert asked == {"blk.0.attn_output.weight": "f16", "blk.1.attn_v.weight": "q8_0",  # the first match wins
                     "blk.1.ffn_down.weight": "q6_k", "blk.2.ffn_down.weight": "q5_0", "blk.0.attn_q.weight": None,
                     "output.weight": "q6_k", "token_embd.weight": "q4_k"}
    pure = TensorTypes(output_tensor_type="q8_0", pure=True)
    assert pure.asked("blk.0.attn_q.weight", "q4_k_m", tied=True) == "q4_k"  # the type's base type
    assert pure.asked("token_embd.weight", "q4_k_m", tied=True) == "q4_k"  # pure: no mixture rule ties it
    assert TensorTypes(output_tensor_type="q8_0").asked("token_embd.weight", "q4_k_m", tied=True) == "q8_0"
    assert not TensorTypes()


@pytest.mark.parametrize(("option", "match"), [
    (["--tensor-type", "attn_v=q9_k"], "unknown tensor type 'q9_k'"),
    (["--tensor-type", "(attn=q8_0"], "not a regular expression"),
    (["--tensor-type", "(?P<x>attn)=q8_0"], "llama.cpp's regular expressions (ECMAScript) have no"),
    (["--tensor-type", "attn_v"], "expected PATTERN=TYPE"),
    (["--output-tensor-type", "q4_k_m"], "--output-tensor-type: unknown tensor type 'q4_k_m'"),
    (["--tensor-type", "attn_v=iq2_xs"], "tensor type iq2_xs needs an importance matrix"),
    (["--outtype", "q4_k_m,iq2_xs"], "iq2_xs needs an importance matrix"),
    (["--outtype", "f16", "--pure"], "apply to quantized types, not f16"),
    (["--outtype", "q4_0,q8_0", "-o", "one.gguf"], "an existing folder or a file name with {type}"),
])
def test_bad_requests_refused_in_one_line(llama: Path, tmp_path: Path, option: list[str], match: str) -> None:
    args = ["--outtype", "q4_k_m", *option] if option[0] != "--outtype" else option
    args = [str(tmp_path / a) if a == "one.gguf" else a for a in args]
    one_line_error(invoke("convert", llama, "-o", tmp_path / "o-{type}.gguf", *args, "-q"), match)
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_of_a_set(llama: Path, scales: Path, tmp_path: Path) -> None:
    """Without --force, a file at an output's name is refused; with --resume it is kept only if it is that type
    from these scales."""
    outputs = output_paths(["q4_0", "q8_0"], tmp_path, llama, folded=True)
    outputs["q4_0"].write_bytes(b"an older file")
    one_line_error(invoke("fold-and-convert", llama, scales, "-o", tmp_path, "--outtype", "q4_0,q8_0", "-q"),
                   "already exists (use --force")
    writer = GGUFWriter(str(outputs["q4_0"]), "llama")  # the right type, from other scales
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    writer.add_string(GGUFKeys.SCALES_SHA256, "0" * 64)
    writer.add_tensor("token_embd.weight", np.ones((2, 32), dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    one_line_error(invoke("fold-and-convert", llama, scales, "-o", tmp_path, "--outtype", "q4_0,q8_0", "--resume",
                          "-q"), "already exists (use --force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-seal-q4_0.gguf"]


# -- a set: converted once, each type as its own run makes it, Ctrl-C and resume --

def test_set_interrupted_resumed_equals_separate_runs(llama: Path, scales: Path, singles: dict[str, Path],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conversions: list[str] = []
    real_converter = convert_module.run_converter

    def counted(*args: object, **kwargs: object) -> None:
        conversions.append(str(args[3]))  # the outtype the converter writes
        real_converter(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_module, "run_converter", counted)
    outputs = output_paths(list(SET), tmp_path, llama, folded=True)

    def ctrl_c_after_first(name: str, path: Path, written: bool) -> None:
        raise KeyboardInterrupt  # as Ctrl-C (or cli.app.Terminated) arrives while the next type starts

    with pytest.raises(KeyboardInterrupt):
        convert_to_ggufs(llama, outputs, scales, progress=False, report=ctrl_c_after_first)
    assert [p.name for p in tmp_path.iterdir()] == ["model-seal-q4_k_m.gguf"]  # no intermediate, no partial file
    first = outputs["q4_k_m"].stat()

    again = ["fold-and-convert", llama, scales, "-o", tmp_path, "--outtype", ",".join(SET), "-q"]
    one_line_error(invoke(*again), "already exists (use --force")  # a finished file is kept only when asked
    result = invoke(*again, "--resume")
    assert result.exit_code == 0, result.output
    assert f"Kept {outputs['q4_k_m']} (q4_k_m" in result.output
    assert f"Wrote {outputs['q8_0']} (q8_0" in result.output and f"Wrote {outputs['f32']} (f32" in result.output
    assert (outputs["q4_k_m"].stat().st_ino, outputs["q4_k_m"].stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert conversions == ["f32", "f32"]  # once per run, into the lossless intermediate
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in outputs.values())
    for name, path in outputs.items():
        assert tensors(path) == tensors(singles[name]), name

    import llama_cpp

    for path in outputs.values():
        model = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False)
        model.eval([1, 200, 300, 400])
        assert np.isfinite(np.asarray(model.scores[:4])).all()


# -- per-tensor types --

def test_tensor_types_stored_as_asked(singles: dict[str, Path], tmp_path: Path) -> None:
    source = singles["f32"]
    mixed = types(singles["q4_k_m"])
    assert "Q6_K" in {mixed[f"blk.{i}.ffn_down.weight"] for i in range(2)}  # q4_k_m's mixture
    out = tmp_path / "asked.gguf"
    result = invoke("quantize", source, out, "q4_k_m", "--tensor-type", r"blk\.1\.attn_q=q5_0",
                    "--tensor-type", "ffn_down=q8_0", "--tensor-type", "ffn=q4_0", "--output-tensor-type", "q4_k",
                    "--token-embedding-type", "q8_0", "--attn-output-type", "bf16", "-q")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output
    stored = types(out)
    assert stored["blk.1.attn_q.weight"] == "Q5_0" and stored["blk.0.attn_q.weight"] == "Q4_K"
    assert {stored[f"blk.{i}.ffn_down.weight"] for i in range(2)} == {"Q8_0"}  # the first match wins
    assert {stored[f"blk.{i}.ffn_{p}.weight"] for i in range(2) for p in ("up", "gate")} == {"Q4_0"}
    assert {stored[f"blk.{i}.attn_output.weight"] for i in range(2)} == {"BF16"}
    assert stored["output.weight"] == "Q4_K" and stored["token_embd.weight"] == "Q8_0"

    pure = tmp_path / "pure.gguf"
    assert invoke("quantize", source, pure, "q4_k_m", "--pure", "-q").exit_code == 0
    assert {t for n, t in types(pure).items() if n.endswith(".weight") and "norm" not in n} == {"Q4_K"}


def test_one_type_into_a_folder_and_an_unmatched_pattern(llama: Path, converter: Path, tmp_path: Path) -> None:
    """convert -o FOLDER with one type writes FOLDER/MODEL-TYPE.gguf; a --tensor-type pattern that matches
    nothing is a warning (seen on the lossless intermediate, once), the others apply."""
    result = invoke("convert", llama, "-o", tmp_path, "--outtype", "q4_0", "--tensor-type", "attn_vv=q8_0",
                    "--tensor-type", "attn_v=q8_0", "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "model-q4_0.gguf"
    assert [p.name for p in tmp_path.iterdir()] == [out.name] and f"Wrote {out} (q4_0, " in result.output
    assert result.stderr.splitlines() == ["Warning: --tensor-type 'attn_vv=q8_0' matches none of the model's 16 "
                                          "tensors that llama.cpp quantizes: it changes nothing (the GGUF names them "
                                          "like blk.0.attn_v.weight)"]
    assert {t for n, t in types(out).items() if n.endswith("attn_v.weight")} == {"Q8_0"}


def test_fallback_reported(tiny_model, converter: Path, tmp_path: Path) -> None:
    """--pure asks Q4_K of every tensor; attn_output's rows of 128 (mistral: 4 heads of 32) are not
    whole Q4_K blocks: llama.cpp stores Q5_0, and stderr says so."""
    out = tmp_path / "pure.gguf"
    result = invoke("convert", tiny_model("mistral"), "-o", out, "--outtype", "q4_k_m", "--pure", "-q")
    assert result.exit_code == 0, result.output
    assert {t for n, t in types(out).items() if n.endswith("attn_output.weight")} == {"Q5_0"}
    assert ("llama.cpp stored 2 tensor(s) (blk.0.attn_output.weight, ...) as Q5_0, not the Q4_K asked for: "
            "their rows of 128 are not whole Q4_K blocks of 256") in result.output
