"""The README's usage example runs as written (x-transformers' test_readme idea)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_usage_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    [example] = [block for block in blocks if "VanillaTransformerConfig()" in block]
    exec(compile(example, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([1, 3, 1000])" in printed


def test_the_readme_names_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in README.read_text(encoding="utf-8")


def test_the_section_table_points_at_the_lines_that_define_each_name():
    """Each `[`name`](file#Lnn)` link in the README lands on the line that defines `name`: the links cannot drift."""
    links = re.findall(r"\[`(\w+)`\]\(([\w/.]+\.py)#L(\d+)\)", README.read_text(encoding="utf-8"))
    assert len(links) >= 10
    for name, path, line in links:
        text = (README.parent / path).read_text(encoding="utf-8").splitlines()[int(line) - 1]
        assert re.match(rf"\s*(class |def )?{name}\b", text), (name, path, line, text)
