"""The control-plane harness itself: its kubeconfig serves kubectl, the kubernetes client and kopf, and the
by-hand entry point starts, prints what a developer needs, and stops cleanly."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness import controlplane as cp
from tests.harness.controlplane import REPO
from tests.harness.waiting import stop_process

pytestmark = pytest.mark.controlplane


def test_kubeconfig_serves_the_kubernetes_client(controlplane: cp.ControlPlane) -> None:
    kubernetes = importlib.import_module("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=str(controlplane.kubeconfig))
    try:
        names = [ns.metadata.name for ns in kubernetes.client.CoreV1Api(client).list_namespace().items]
    finally:
        client.close()
    assert "default" in names and "kube-system" in names


def test_rbac_is_enforced_for_everyone_but_the_admin(controlplane: cp.ControlPlane) -> None:
    assert controlplane.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
    nobody = controlplane.kubectl("auth", "can-i", "list", "secrets", "-A", "--as=nobody", check=False)
    assert nobody.stdout.strip() == "no"


def test_kopf_logs_in_with_the_kubeconfig_and_handles_a_registrymirror(
        controlplane: cp.ControlPlane, installed: str, tmp_path: Path) -> None:
    importlib.import_module("kopf")
    handlers = tmp_path / "handlers.py"
    handlers.write_text(textwrap.dedent("""
        import kopf

        @kopf.on.create("regmirror.io", "v1alpha1", "registrymirrors")
        def created(patch, **_):
            patch.status["message"] = "seen by kopf"
    """))
    name = "e2e-kopf"
    kopf = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", str(handlers)],
        env=controlplane.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        controlplane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps({
            "apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": name},
            "spec": {"registry": "ghcr.io", "mirrors": [{"url": "https://ghcr.example.com"}]}}))
        deadline = time.monotonic() + 30
        while True:
            obj = json.loads(controlplane.kubectl("get", "registrymirror", name, "-o", "json").stdout)
            if obj.get("status", {}).get("message") == "seen by kopf" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert obj.get("status", {}).get("message") == "seen by kopf", obj
        # kopf only adds a finalizer for deletion handlers; with none, deletion never waits for the operator.
        assert not obj["metadata"].get("finalizers")
    finally:
        out = stop_process(kopf)
        controlplane.kubectl("delete", "registrymirror", name, "--ignore-not-found", "--wait", "--timeout=10s")
    assert "Traceback" not in out, out


def test_by_hand_entry_point_prints_a_kubeconfig_and_stops_on_ctrl_c(controlplane: cp.ControlPlane) -> None:
    # `controlplane` only makes sure the binaries exist; this starts a second, independent control plane.
    proc = subprocess.Popen([sys.executable, "-m", "tests.harness.controlplane"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("export KUBECONFIG="):
                break
        kubeconfig = Path(lines[-1].strip().split("=", 1)[1])
        assert kubeconfig.is_file(), "".join(lines)
        ns = subprocess.run([str(controlplane.binaries.kubectl), "--kubeconfig", str(kubeconfig), "get", "ns",
                             "default", "-o", "name"], capture_output=True, text=True, timeout=30, check=True)
        assert ns.stdout.strip() == "namespace/default"
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0, "".join(lines) + rest
    assert not kubeconfig.parent.exists(), "the temporary folder was left behind"


def test_kubebuilder_assets_wins_over_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("etcd", "kube-apiserver"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        os.chmod(tmp_path / name, 0o755)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    found = cp.find_binaries(build=False)
    assert (found.etcd, found.kube_apiserver) == (tmp_path / "etcd", tmp_path / "kube-apiserver")

    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "missing"))
    with pytest.raises(cp.ControlPlaneError, match="KUBEBUILDER_ASSETS"):
        cp.find_binaries(build=False)
