"""`seal-gguf demo --quick`: every step end to end on the real SmolLM2 model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from seal_gguf.bundled import BUNDLED, bundled_scales
from seal_gguf.cli.app import cli
from seal_gguf.ship.inspect import inspect_path

pytestmark = pytest.mark.slow


def test_bundled_scales_have_provenance() -> None:
    for granularity in BUNDLED:
        report = inspect_path(bundled_scales(granularity))
        meta = report["metadata"]
        assert report["granularity"] == granularity and meta["model_type"] == "llama"
        assert meta["task"] == "lines" and meta["command"].startswith("seal-gguf train")
        assert report["min"] > 0 and report["max"] > report["min"]


def test_demo_quick(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    for row in ("| f16 | base |", "| f16 | SEAL-H |", "| q4_k_m | SEAL-C |", "| q8_0 | base |"):
        assert row in report, report
    assert "Validation: passed." in report
    # gain and cost side by side: every SEAL GGUF has its general-text cost against the base of its type
    assert "| type | model | 512 tokens | general PPL | mean KLD | same top-1 |" in report
    for row in ("| f16 | SEAL-H |", "| q4_k_m | SEAL-C |"):
        line = next(x for x in report.splitlines() if x.startswith(row))
        assert re.search(r"\| ×\d\.\d{3} \| [\d.e-]+ \| \d+\.\d% \|$", line), line
    assert (out / "retrieval.png").stat().st_size > 0
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert {m["name"] for m in retrieval["models"]} >= {"base-f16.gguf", "seal-h-q8_0.gguf", "seal-c-q4_k_m.gguf"}
    for name in ("validate-seal-h.json", "validate-seal-c.json"):
        assert json.loads((out / name).read_text())["passed"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
