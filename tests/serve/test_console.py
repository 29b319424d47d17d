"""What ``zimage-platform serve`` (``make run``) shows while it builds: the steps of the first build,
then one line when the engines are ready; the libraries' warnings go to var/logs/build.log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # exports the tiny model to ONNX (about 40 s on two cores)

#: The build step of ``serve`` (EmbeddedPlatform.start), alone, in a fresh data folder.
BUILD = """
import sys
from zimage_platform.config import load_config
from zimage_platform.serve.launcher import prepare_engines

root = sys.argv[1]
prepare_engines(load_config(paths={"data_dir": f"{root}/var", "engines_dir": f"{root}/engines",
                                   "engine_build_dir": f"{root}/build"}))
"""


def test_the_first_build_shows_its_steps_and_no_library_warnings(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZIMAGE_", "PYTHONWARNINGS"))}
    run = subprocess.run(
        [sys.executable, "-c", BUILD, str(tmp_path)], capture_output=True, text=True, env=env, timeout=900
    )
    assert run.returncode == 0, run.stderr
    # Not a terminal here: one line per step instead of the bar.
    assert run.stderr.splitlines() == [
        "  [1/4] tiny checkpoint ...",
        "  [2/4] onnxruntime engine: base ...",
        "  [3/4] onnxruntime engine: edit ...",
        "  [4/4] onnxruntime engine: turbo ...",
    ]
    assert re.fullmatch(r"engines ready \(onnxruntime: base, edit, turbo\) in \d+ s\n", run.stdout), run.stdout
    assert "warn" not in (run.stdout + run.stderr).lower()
    log = (tmp_path / "var" / "logs" / "build.log").read_text()
    assert "Loading pipeline components" in log  # what the libraries printed is kept, not lost
