"""Command-line tools the tests drive (promtool, helm, hadolint), installed by
``scripts/install-tools.sh`` into ``./.tools/bin`` (``make test`` runs it first)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """The tool's path: the project's own copy first, then ``PATH``. Missing fails, never skips."""
    local = REPO / ".tools" / "bin" / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run ./scripts/install-tools.sh (make test does)")
    return found
