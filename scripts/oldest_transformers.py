"""Print the oldest transformers version pyproject.toml declares (its `>=` bound); scripts/setup.sh installs it."""

import re
from pathlib import Path

import tomllib


def declared_transformers() -> str:
    """The transformers requirement of pyproject.toml, e.g. "transformers>=5.24,<5.26"."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (requirement,) = [dep for dep in pyproject["project"]["dependencies"] if re.match(r"transformers\b", dep)]
    return requirement


def oldest_transformers() -> str:
    match = re.search(r">=\s*([\w.]+)", declared_transformers())
    if match is None:
        raise ValueError(f"pyproject.toml declares {declared_transformers()!r}, with no lower bound to test")
    return match.group(1)


if __name__ == "__main__":
    print(oldest_transformers())
