"""Fill `model_card.md` (this package's template, every published model's card) with the facts of one training run.

The template has `{{name}}` placeholders and optional blocks `<!-- if name -->...<!-- end -->`, which may nest. A
block whose value is unknown (missing or None) is left out, so the card never states a number the run did not
produce; a placeholder outside any block must be given. `{{name|yaml}}` writes the value as a YAML scalar that reads
back as that same value (quoted where YAML would read it otherwise: a file name with ": ", the language code `no`),
for the front matter the Hub reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_card.md"  # package data: a wheel ships it
# A block with no block inside it: filled innermost first, so that blocks nest.
_BLOCK = re.compile(r"<!-- if (\w+) -->\n?((?:(?!<!-- if ).)*?)<!-- end -->\n?", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{\{(\w+)(\|yaml)?\}\}")


def render_model_card(values: dict[str, Any], template: str | None = None) -> str:
    """The card for `values`; raises ValueError naming any required placeholder that has no value."""
    if template is None:
        template = TEMPLATE_PATH.read_text(encoding="utf-8")
    known = {key: value for key, value in values.items() if value is not None}
    text, previous = template, None
    while text != previous:
        previous, text = text, _BLOCK.sub(lambda m: m.group(2) if m.group(1) in known else "", text)
    missing = sorted({name for name, _ in _PLACEHOLDER.findall(text) if name not in known})
    if missing:
        raise ValueError(f"model card template needs values for: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: yaml_scalar(known[m.group(1)]) if m.group(2) else str(known[m.group(1)]), text)


def yaml_scalar(value: Any) -> str:
    """`value` as a one-line YAML scalar that reads back as `value`: as written where it does, else a string in
    double quotes (JSON's string escapes are YAML's)."""
    text = str(value)
    try:
        plain = "\n" not in text and yaml.safe_load(f"key: {text}") == {"key": value}
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text, ensure_ascii=False)
