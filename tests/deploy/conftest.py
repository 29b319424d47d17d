"""Fixtures for the chart, image and manifest tests: the real helm, each profile rendered once.

No Kubernetes API server can run on the machines this is built on, so the chart is proven by
rendering (real helm), offline schema validation (kubernetes-validate for built-in kinds, the
KubeRay operator's own CRD schemas for RayService/RayCluster) and by building the Serve app from
the config the chart renders.
"""

from __future__ import annotations

from typing import Any

import pytest
from chart_support import documents, render


@pytest.fixture(scope="session")
def helm_bin() -> str:
    """The real helm; `make test` installs it (scripts/install-tools.sh), so its absence is a failure."""
    try:
        return render.helm_binary()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def rendered(helm_bin: str) -> dict[str, list[dict[str, Any]]]:
    """Every profile rendered once (`helm test` pods included: they are validated too)."""
    return {profile: documents(render.render(profile)) for profile in render.PROFILES}
