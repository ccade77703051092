"""Fill `model_card.md` (this package's template, every published model's card) with the facts of one training run.

The template has `{{name}}` placeholders and optional blocks `<!-- if name -->...<!-- end -->`. A block whose value
is unknown (missing or None) is left out, so the card never states a number the run did not produce; a
placeholder outside any block must be given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_card.md"  # package data: a wheel ships it
_BLOCK = re.compile(r"<!-- if (\w+) -->\n?(.*?)<!-- end -->\n?", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def render_model_card(values: dict[str, Any], template: str | None = None) -> str:
    """The card for `values`; raises ValueError naming any required placeholder that has no value."""
    if template is None:
        template = TEMPLATE_PATH.read_text(encoding="utf-8")
    known = {key: value for key, value in values.items() if value is not None}
    text = _BLOCK.sub(lambda m: m.group(2) if m.group(1) in known else "", template)
    missing = sorted({name for name in _PLACEHOLDER.findall(text) if name not in known})
    if missing:
        raise ValueError(f"model card template needs values for: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(known[m.group(1)]), text)
