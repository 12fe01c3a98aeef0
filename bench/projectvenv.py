"""Run a bench script with the project's own Python environment, however it was started.

The bench README says `python3 bench/deploy_bench.py`: with the system python3 neither fabric nor `fab`
is found. ``use()`` re-runs the script under ``<repo>/.venv/bin/python`` (what ./quickstart.sh up makes)
and puts that venv's bin first on PATH, so every `fab` the bench starts is the project's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def use() -> None:
    python = VENV / "bin" / "python"
    if not python.exists():
        sys.exit(f"bench: no {VENV}: run ./quickstart.sh up first (it makes it), or activate the "
                 "environment you installed booted into (source .venv/bin/activate)")
    bin_dir = str(VENV / "bin")
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[:1] != [bin_dir]:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(python), [str(python), *sys.argv])
