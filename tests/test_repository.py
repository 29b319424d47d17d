"""The repository stands on its own: tests read only what the checkout carries."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kuberay-crds/ray.io_rayservices.yaml", "comfyui-reference/get_features.json"])
def test_reading_beside_the_checkout_fails_loudly(name):
    """tests/conftest.py refuses ../shared (present or not), so a test cannot pass only where it exists."""
    with pytest.raises(RuntimeError, match="tests must not read"):
        (REPO.parent / "shared" / name).read_bytes()
    with pytest.raises(RuntimeError, match="tests must not read"):
        list((REPO.parent / "shared").iterdir())


def test_the_test_data_is_carried_with_its_provenance():
    fixtures = REPO / "tests" / "fixtures"
    for folder in ("kuberay-crds", "comfyui-reference"):
        provenance = (fixtures / folder / "PROVENANCE.md").read_text()
        assert "source" in provenance and "licence" in provenance
    assert "Apache License" in (fixtures / "kuberay-crds" / "LICENSE").read_text()
