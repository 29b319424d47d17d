"""Engine folders change whole or not at all: builds and pulls write into a staging folder
beside the engine's and swap it in at the end, so a crash never leaves half an engine."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zimage_platform.engines.manifest import EngineManifest, sha256_file


@contextmanager
def staged_folder(folder: Path, prefix: str) -> Iterator[Path]:
    """Yield an empty staging folder; replace ``folder`` with it if the block succeeds, else remove it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (engine files are never modified in place)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def files_intact(folder: Path, manifest: EngineManifest) -> bool:
    """Every file the manifest lists is there with its recorded hash."""
    return bool(manifest.files) and all(
        (folder / n).is_file() and sha256_file(folder / n) == h for n, h in manifest.files.items()
    )
