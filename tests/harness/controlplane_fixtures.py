"""Pytest fixtures for the real control plane; load with ``pytest_plugins = ["tests.harness.controlplane_fixtures"]``.

One etcd + kube-apiserver per test session: starting one takes seconds, and the objects under test are
cluster-scoped anyway, so tests share it and clean up what they create.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import controlplane as cp


@pytest.fixture(scope="session")
def controlplane() -> Iterator[cp.ControlPlane]:
    """A running control plane; ``.kubeconfig``, ``.kubectl(...)``, ``.env()``, ``.server``, ``.token``.

    Set ``REGMIRROR_KEEP_CONTROLPLANE=1`` to keep its folder (logs, etcd data, kubeconfig) after the session.
    """
    plane = cp.ControlPlane(keep_workdir=os.environ.get("REGMIRROR_KEEP_CONTROLPLANE") == "1")
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubeconfig(controlplane: cp.ControlPlane) -> Path:
    """Path of the admin kubeconfig of the session's control plane."""
    assert controlplane.kubeconfig is not None
    return controlplane.kubeconfig
