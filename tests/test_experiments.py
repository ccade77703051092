"""The design-choice experiments (experiments/) run end to end in their smoke mode: figures and a report with
numbers. The smoke numbers mean nothing; the full runs are committed under experiments/results/."""

from __future__ import annotations

import importlib
import re

import pytest

SCRIPTS = ["e1_why_scale", "e2_attention_types", "e3_norms", "e4_heads", "e5_positions"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_experiment_smoke(name, tmp_path):
    module = importlib.import_module(f"experiments.{name}")
    module.main(["--smoke", "--out", str(tmp_path)])
    pictures = list(tmp_path.glob("*.png"))
    assert pictures, f"{name} wrote no figure"
    assert all(p.stat().st_size > 1000 for p in pictures)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Smoke run" in report and f"experiments.{name} --smoke" in report
    assert "](" in report  # links its figure(s)
    table_numbers = re.findall(r"\|\s*-?\d+(?:\.\d+)?(?:e[+-]?\d+)?\s*(?=\|)", report)
    assert len(table_numbers) >= 4, "the report's table holds no measured numbers"
