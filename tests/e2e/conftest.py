"""e2e: the project's own CRD, manifests and examples against a real kube-apiserver."""

from __future__ import annotations

import pytest

from tests.harness import controlplane as cp
from tests.harness.controlplane import REPO

CRD_NAME = "registrymirrors.regmirror.io"


def pytest_configure(config: pytest.Config) -> None:
    # Not `pytest_plugins = [...]`: pytest refuses that outside the root conftest. import_plugin is a no-op
    # when the root conftest has loaded the plugin already.
    config.pluginmanager.import_plugin("tests.harness.controlplane_fixtures")


@pytest.fixture(scope="session")
def installed(controlplane: cp.ControlPlane) -> str:
    """Install manifests/ the way a user does (server-side apply), once per session; returns kubectl's output."""
    done = controlplane.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
    controlplane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    return done.stdout
