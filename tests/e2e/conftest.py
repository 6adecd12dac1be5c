"""e2e: the project's own CRD, manifests and examples against a real kube-apiserver."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness import controlplane as cp
from tests.harness.controlplane import REPO

CRD_NAME = "registrymirrors.regmirror.io"
AGENT = "system:serviceaccount:regmirror-system:regmirror-agent"


def pytest_configure(config: pytest.Config) -> None:
    # Not `pytest_plugins = [...]`: pytest refuses that outside the root conftest. import_plugin is a no-op
    # when the root conftest has loaded the plugin already.
    config.pluginmanager.import_plugin("tests.harness.controlplane_fixtures")


@pytest.fixture(scope="session")
def installed(controlplane: cp.ControlPlane) -> str:
    """Install manifests/ the way a user does (server-side apply), once per session; returns kubectl's output."""
    done = controlplane.kubectl("apply", "--server-side", "-k", str(REPO / "manifests"))
    controlplane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    wait_for_agent_policy(controlplane)
    return done.stdout


def wait_for_agent_policy(controlplane: cp.ControlPlane, timeout: float = 30.0) -> None:
    """Admission policies take effect when the apiserver's informer sees them: wait until one is enforced."""
    probe = json.dumps({"apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirrorNode",
                        "metadata": {"name": "e2e-policy-probe-other"}})
    deadline = time.monotonic() + timeout
    while True:
        done = controlplane.kubectl("create", "--dry-run=server", "-f", "-", f"--as={AGENT}",
                                    "--as-user-extra=authentication.kubernetes.io/node-name=probe", input=probe,
                                    check=False)
        if "ValidatingAdmissionPolicy" in done.stderr:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent's admission policy was not enforced within {timeout:.0f} s: "
                                 f"{done.stdout}{done.stderr}")
        time.sleep(0.2)
