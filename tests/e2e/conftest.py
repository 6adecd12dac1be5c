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
    probe = "e2e-policy-probe"
    controlplane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
        "apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": probe},
        "spec": {"registry": "probe.example.com", "mirrors": [{"url": "https://m.example.com"}]}}))
    deadline = time.monotonic() + timeout
    try:
        while True:
            done = controlplane.kubectl(
                "patch", "registrymirror", probe, "--subresource=status", "--type=merge", "--dry-run=server",
                "-p", '{"status": {"ready": "1/1"}}', f"--as={AGENT}",
                "--as-user-extra=authentication.kubernetes.io/node-name=probe", check=False)
            if "ValidatingAdmissionPolicy" in done.stderr:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the agent's admission policy was not enforced within {timeout:.0f} s: "
                                     f"{done.stdout}{done.stderr}")
            time.sleep(0.2)
    finally:
        controlplane.kubectl("delete", "registrymirror", probe, "--wait", "--timeout=10s")
