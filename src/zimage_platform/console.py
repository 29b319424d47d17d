"""What a person sees while the platform builds: progress, not the libraries' chatter.

Exporting to ONNX makes torch, onnxscript and diffusers print warnings (``FutureWarning``,
"torchvision is not installed", tqdm bars) from Python and from C++, through ``warnings``,
their own logging handlers and plain writes. :func:`library_output_to` sends all of it, at the
file-descriptor level, to a log file for the duration of a build, so nothing a library does can
reach the terminal; the progress bar writes to the real terminal meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig


def build_log(config: PlatformConfig) -> Path:
    """Where the libraries' output during engine builds goes (``<data_dir>/logs/build.log``)."""
    return config.paths.data_dir / "logs" / "build.log"


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # C stdio buffers (libraries printing from C/C++)
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def library_output_to(log_file: Path) -> Iterator[IO[str]]:
    """Send stdout and stderr (fds 1 and 2) to ``log_file`` while the block runs; yields a text
    stream on the original stderr, for progress a person should see."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _flush_all()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})\n".encode())
        log.flush()
        for fd in saved:
            os.dup2(log.fileno(), fd)
        try:
            yield terminal
        finally:
            _flush_all()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()


class BuildProgress:
    """One bar over the build's steps (checkpoint, then each engine), with the current step and
    the elapsed time; on a non-terminal (CI, a pipe) one line per step instead."""

    def __init__(self, stream: IO[str], total: int) -> None:
        self.console = Console(file=stream, stderr=False)
        self.total = total
        self.done = 0
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> BuildProgress:
        if self.console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("preparing", total=self.total)
        return self

    def step(self, description: str) -> None:
        """Start the next step (the previous one is done)."""
        if self._progress is not None:
            self._progress.update(self._task, description=description, completed=self.done)
        else:
            self.console.print(f"  [{self.done + 1}/{self.total}] {description} ...", highlight=False)
        self.done += 1

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
            self._progress.stop()
