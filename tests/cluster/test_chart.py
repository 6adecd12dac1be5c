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


#: The relabeling both monitors carry: each target's node, as a label an admin reads in an alert.
NODE_LABEL = {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}


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
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                                       "relabelings": [NODE_LABEL]}]
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    selected = {agent["metadata"]["labels"]["app.kubernetes.io/name"],
                operator["metadata"]["labels"]["app.kubernetes.io/name"]}
    assert expression["operator"] == "In" and set(expression["values"]) == selected
    # Off by default; a PodMonitor without metrics is refused rather than scraping nothing.
    assert ("PodMonitor", "regmirror") not in objects(run(helm, "template", "regmirror", CHART))
    done = subprocess.run([str(helm), "template", "regmirror", str(CHART), "--set", "metrics.podMonitor.enabled=true"],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "needs metrics.enabled" in done.stderr


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Does a label selector (matchLabels and matchExpressions with In) select these labels?"""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(e["operator"] == "In" and labels.get(e["key"]) in e["values"]
               for e in selector.get("matchExpressions", []))


def test_a_service_monitor_scrapes_the_metrics_ports_the_workloads_expose(helm: Path) -> None:
    rendered = objects(run(helm, "template", "regmirror", CHART, "--set", "metrics.enabled=true",
                           "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.agentPort=9900",
                           "--set", "metrics.serviceMonitor.labels.release=kps"))
    monitor = rendered[("ServiceMonitor", "regmirror")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "regmirror-system"
    assert monitor["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s", "relabelings": [NODE_LABEL]}
    services = {name: obj for (kind, name), obj in rendered.items() if kind == "Service"}
    scraped = {name for name, svc in services.items()
               if _selects(monitor["spec"]["selector"], svc["metadata"]["labels"])}
    assert scraped == {"regmirror-agent-metrics", "regmirror-operator-metrics"}
    workloads = {"regmirror-agent-metrics": (("DaemonSet", "regmirror-agent"), 9900),
                 "regmirror-operator-metrics": (("Deployment", "regmirror-operator"), 9809)}
    for name, (workload, port) in workloads.items():
        service = services[name]
        assert service["metadata"]["namespace"] == rendered[workload]["metadata"]["namespace"]
        assert service["spec"]["clusterIP"] == "None"  # headless: the pods' own (node) addresses, no kube-proxy
        # The Service selects the pods of its workload, and only those: the pod template's labels ...
        template = rendered[workload]["spec"]["template"]
        selector = {"matchLabels": service["spec"]["selector"]}
        assert _selects(selector, template["metadata"]["labels"])
        other = next(obj for key, obj in rendered.items() if key in dict(workloads.values()) and key != workload)
        assert not _selects(selector, other["spec"]["template"]["metadata"]["labels"])
        # ... on the port the container names `metrics`, the one the ServiceMonitor's endpoint names.
        (service_port,) = service["spec"]["ports"]
        assert service_port["name"] == endpoint["port"]
        container_ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert container_ports[service_port["targetPort"]] == service_port["port"] == port
        # The job label: the workload's name, from the Service's label the ServiceMonitor names.
        assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == workload[1]
    # Off by default; a ServiceMonitor without metrics is refused rather than scraping nothing.
    default = objects(run(helm, "template", "regmirror", CHART, "--set", "metrics.enabled=true"))
    assert not {kind for kind, _ in default} & {"ServiceMonitor", "Service"}
    done = subprocess.run([str(helm), "template", "regmirror", str(CHART),
                           "--set", "metrics.serviceMonitor.enabled=true"], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "needs metrics.enabled" in done.stderr


def _operator_env(rendered: dict[tuple[str, str], Any]) -> dict[str, str]:
    container = rendered[("Deployment", "regmirror-operator")]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_restart_budget_values_reach_the_operator(helm: Path) -> None:
    default = _operator_env(objects(run(helm, "template", "regmirror", CHART)))
    assert (default["REGMIRROR_MAX_UNAVAILABLE"], default["REGMIRROR_RESTART_ATTEMPTS"]) == ("1", "3")
    values = yaml.safe_load((CHART / "values.yaml").read_text())["rollout"]
    assert values == {"maxUnavailable": 1, "restartAttempts": 3}
    for budget in ("10%", "2"):
        env = _operator_env(objects(run(helm, "template", "regmirror", CHART, "--set",
                                        f"rollout.maxUnavailable={budget}", "--set", "rollout.restartAttempts=5")))
        assert (env["REGMIRROR_MAX_UNAVAILABLE"], env["REGMIRROR_RESTART_ATTEMPTS"]) == (budget, "5")


def test_image_rewrite_value_renders_the_kustomize_component(helm: Path, tmp_path: Path) -> None:
    """``imageRewrite.enabled`` installs what adding the component manifests/image-rewrite to the kustomize install
    does: the webhook's objects, and the operator's env and port, in the component's order."""
    kubectl = find_binaries().kubectl
    assert kubectl is not None
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(REPO / "manifests", tmp_path)],
        "components": [os.path.relpath(REPO / "manifests" / "image-rewrite", tmp_path)]}))
    kustomized = objects(run(kubectl, "kustomize", tmp_path))
    rendered = objects(run(helm, "template", "regmirror", CHART, "--include-crds", "--no-hooks",
                           "--set", "imageRewrite.enabled=true"))
    assert ("MutatingWebhookConfiguration", "regmirror-image-rewrite") in rendered
    assert sorted(rendered) == sorted(kustomized)
    for key, obj in kustomized.items():
        assert rendered[key] == obj, key
    operator = rendered[("Deployment", "regmirror-operator")]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "REGMIRROR_WEBHOOK", "value": "on"} in operator["env"]
    assert {"containerPort": 9443, "name": "webhook"} in operator["ports"]
    run(helm, "lint", "--strict", CHART, "--set", "imageRewrite.enabled=true")
