"""The Helm chart (charts/regmirror/) renders what the kustomize install does, and passes `helm lint`.

The chart is generated from manifests/ (hack/gen_chart.py); these tests keep the two from drifting: the committed
chart is what the generator makes of today's manifests, and `helm template` with default values renders exactly the
objects of `kubectl kustomize manifests/`. helm is built from its Go module (hack/build-control-plane.sh). Installing,
upgrading and uninstalling the chart on a real cluster is in test_install.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.controlplane import CACHE_BIN, find_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "regmirror"


def helm_binary() -> Path:
    helm = CACHE_BIN / "helm"
    if not helm.exists():
        subprocess.run(["bash", str(REPO / "hack" / "build-control-plane.sh"), str(CACHE_BIN)], check=True,
                       env={**os.environ, "REGMIRROR_BUILD": "helm"})
    return helm


def run(*argv: str | Path) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}:\n{done.stderr}{done.stdout}"
    return done.stdout


def objects(text: str) -> dict[tuple[str, str], Any]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


def test_the_committed_chart_is_what_the_manifests_generate() -> None:
    done = subprocess.run([sys.executable, str(REPO / "hack" / "gen_chart.py"), "--check"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_helm_lint_passes(helm: Path) -> None:
    out = run(helm, "lint", "--strict", CHART)
    assert "0 chart(s) failed" in out, out


def test_helm_template_renders_the_objects_of_the_kustomize_install(helm: Path) -> None:
    kubectl = find_binaries().kubectl
    assert kubectl is not None
    kustomized = objects(run(kubectl, "kustomize", REPO / "manifests"))
    rendered = objects(run(helm, "template", "regmirror", CHART, "--include-crds", "--no-hooks"))
    assert sorted(rendered) == sorted(kustomized)
    for key, obj in kustomized.items():
        assert rendered[key] == obj, key


def test_values_reach_the_workloads(helm: Path) -> None:
    rendered = objects(run(helm, "template", "regmirror", CHART, "--set", "image.repository=reg.example/regmirror",
                           "--set", "image.tag=1.2.3", "--set", "operator.nodeSelector.pool=system",
                           "--set", "agent.resources.limits.memory=200Mi"))
    agent = rendered[("DaemonSet", "regmirror-agent")]["spec"]["template"]["spec"]
    operator = rendered[("Deployment", "regmirror-operator")]["spec"]["template"]["spec"]
    assert agent["containers"][0]["image"] == operator["containers"][0]["image"] == "reg.example/regmirror:1.2.3"
    assert agent["containers"][0]["resources"]["limits"]["memory"] == "200Mi"
    assert operator["nodeSelector"] == {"pool": "system"}
    hook = rendered[("Job", "regmirror-uninstall")]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    assert hook["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["regmirror", "uninstall"]


def test_metrics_values_add_the_port_the_env_and_a_pod_monitor(helm: Path) -> None:
    rendered = objects(run(helm, "template", "regmirror", CHART, "--set", "metrics.enabled=true",
                           "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.labels.release=kps",
                           "--set", "metrics.operatorPort=9900"))
    agent = rendered[("DaemonSet", "regmirror-agent")]["spec"]["template"]
    operator = rendered[("Deployment", "regmirror-operator")]["spec"]["template"]
    for pod, port in ((agent, 9808), (operator, 9900)):
        container = pod["spec"]["containers"][0]
        assert {"name": "REGMIRROR_METRICS_PORT", "value": str(port)} in container["env"]
        assert {"containerPort": port, "name": "metrics"} in container["ports"]
    assert {"containerPort": 9807, "name": "health"} in operator["spec"]["containers"][0]["ports"]
    monitor = rendered[("PodMonitor", "regmirror")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "regmirror-system"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    selected = {agent["metadata"]["labels"]["app.kubernetes.io/name"],
                operator["metadata"]["labels"]["app.kubernetes.io/name"]}
    assert expression["operator"] == "In" and set(expression["values"]) == selected
    # Off by default; a PodMonitor without metrics is refused rather than scraping nothing.
    assert ("PodMonitor", "regmirror") not in objects(run(helm, "template", "regmirror", CHART))
    done = subprocess.run([str(helm), "template", "regmirror", str(CHART), "--set", "metrics.podMonitor.enabled=true"],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "needs metrics.enabled" in done.stderr
