"""Fill ``{{ name }}`` placeholders in the project's config templates (nginx, units).

nginx and shell text are full of ``$``, so ``string.Template`` does not fit. A placeholder with
no value, or a value with no placeholder, is an error: a template and its caller never drift apart.
"""
from __future__ import annotations

import re
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


def render(template: str | Path, values: dict[str, object], strict: bool = True) -> str:
    text = template.read_text() if isinstance(template, Path) else template
    wanted = set(_PLACEHOLDER.findall(text))
    missing = wanted - values.keys()
    if missing:
        raise KeyError(f"template {getattr(template, 'name', '')} needs values for: {', '.join(sorted(missing))}")
    if strict and values.keys() - wanted:
        raise KeyError(f"template {getattr(template, 'name', '')} has no place for: {', '.join(sorted(values.keys() - wanted))}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
