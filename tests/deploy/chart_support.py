"""Helpers shared by the chart, image and manifest tests (helm/render.py loaded as a module)."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def _load_render() -> ModuleType:
    """helm/render.py (the chart tooling `make manifests` runs) as a module."""
    spec = importlib.util.spec_from_file_location("chart_render", REPO / "helm" / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = _load_render()


#: The KubeRay operator's CRDs (gzipped; provenance and licence in the folder's PROVENANCE.md).
KUBERAY_CRDS = REPO / "tests" / "fixtures" / "kuberay-crds"


def kuberay_crd(kind: str) -> dict[str, Any]:
    """The KubeRay CRD of ``kind`` (``RayService``, ``RayCluster``) as carried in tests/fixtures."""
    return yaml.safe_load(gzip.decompress((KUBERAY_CRDS / f"ray.io_{kind.lower()}s.yaml.gz").read_bytes()))


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def profile_values(profile: str) -> dict[str, Any]:
    return yaml.safe_load(render.profile_file(profile).read_text())
