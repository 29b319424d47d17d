"""Fixtures for ``zimage-platform ops``: a fake Kubernetes API server (see ``fakeapi.py``: no real
API server can run on these machines) holding recorded, real-shaped objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fakeapi import FakeApiServer


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    """The fake API server, and a kubeconfig (``$KUBECONFIG``) that points the client at it."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeApiServer() as server:
        monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig(tmp_path)))
        yield server
