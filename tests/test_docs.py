"""What the README states about settings matches the code that applies them."""
from __future__ import annotations

import re
from pathlib import Path

from fabfile.core.config import monitor_defaults

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_lists_every_monitor_default_as_the_code_has_it():
    text = README.read_text()
    start = text.index("The `monitor` block's keys, with their")
    paragraph = text[start:text.index("\n\n", start)]
    stated = {key: float(value) for key, value in re.findall(r"`(\w+)` ([0-9.]+)", paragraph)}
    assert stated == {k: float(v) for k, v in monitor_defaults().items()}
