"""Both ends of the transformers range that pyproject.toml declares are tested. The newest (what pip installs into
.venv) runs the whole suite; the oldest runs the generation tests, which hold the overrides of transformers' private
beam-search helpers and the generation-config merge, in a subprocess that imports it from .venv/transformers-oldest
(`scripts/setup.sh` installs it there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from oldest_transformers import declared_transformers, oldest_transformers  # noqa: E402

OLDEST_FOLDER = ROOT / ".venv" / "transformers-oldest"


def test_the_range_is_closed_and_holds_the_installed_transformers():
    """Declare only what is tested: a lower and an upper bound, and the installed version between them."""
    specifier = Requirement(declared_transformers()).specifier
    assert {spec.operator for spec in specifier} == {">=", "<"}, specifier
    assert Version(transformers.__version__) in specifier, (transformers.__version__, str(specifier))


@pytest.mark.slow
def test_the_generation_tests_pass_on_the_oldest_declared_transformers():
    oldest = oldest_transformers()
    installed = (OLDEST_FOLDER / "VERSION").read_text().strip() if (OLDEST_FOLDER / "VERSION").exists() else None
    if installed != oldest:
        pytest.fail(f"transformers {oldest} is not in {OLDEST_FOLDER}: run scripts/setup.sh")
    env = {**os.environ, "PYTHONPATH": str(OLDEST_FOLDER)}
    version = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Version(version.stdout.strip()) == Version(oldest)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_generation.py", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert tests.returncode == 0, f"on transformers {oldest}:\n{tests.stdout[-4000:]}{tests.stderr[-2000:]}"
