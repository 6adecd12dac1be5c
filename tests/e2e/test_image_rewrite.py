"""Image rewrite on a real kube-apiserver, which calls the operator's webhook on loopback.

The install plus its image-rewrite component (manifests/image-rewrite) as a user applies them, the operator as a
``kopf run`` process with its service account's token (so the component's RBAC is what lets it set the webhook's
clientConfig), and Pods created with ``kubectl create``. No kubelet runs: the Pods stay Pending, which is all
admission needs. The webhook is reached at ``REGMIRROR_WEBHOOK_URL`` (the Service of the install would need a
kube-proxy). Figures (how long a create takes with the webhook up, hung and down) are printed and written to
``.cache/figures/image-rewrite.json``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from regmirror_api import models
from tests.e2e import test_operator
from tests.harness import controlplane as cp
from tests.harness.controlplane import REPO

pytestmark = pytest.mark.controlplane

ON, OFF = "rewrite-on", "rewrite-off"
CONFIGURATION = "regmirror-image-rewrite"
ANNOTATION = "regmirror.io/rewritten-images"
TIMEOUT_SECONDS = 3  # manifests/image-rewrite/webhook.yaml
FIGURES: dict[str, Any] = {}
FIGURES_FILE = REPO / ".cache" / "figures" / "image-rewrite.json"


@pytest.fixture(scope="module")
def component(controlplane: cp.ControlPlane, installed: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The install with the image-rewrite component, as a user composes them; its webhook objects removed after."""
    folder = tmp_path_factory.mktemp("with-image-rewrite")
    (folder / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(REPO / 'manifests', folder)}]\n"
        f"components: [{os.path.relpath(REPO / 'manifests' / 'image-rewrite', folder)}]\n")
    built = controlplane.kubectl("kustomize", str(folder)).stdout
    assert "kind: MutatingWebhookConfiguration" in built and "REGMIRROR_WEBHOOK" in built
    controlplane.kubectl("apply", "--server-side", "-k", str(folder))
    for ns, labels in ((ON, {"regmirror.io/rewrite-images": "enabled"}), (OFF, {})):
        controlplane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}))
        # No controller-manager makes the `default` ServiceAccount, which the apiserver requires of a Pod.
        controlplane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}}))
    try:
        yield
    finally:
        controlplane.kubectl("delete", "mutatingwebhookconfiguration", CONFIGURATION, "--ignore-not-found")
        controlplane.kubectl("delete", "service", "regmirror-operator-webhook", "-n", "regmirror-system",
                             "--ignore-not-found")
        controlplane.kubectl("delete", "clusterrolebinding,clusterrole", "regmirror-operator-webhook",
                             "--ignore-not-found")
        for ns in (ON, OFF):
            controlplane.kubectl("delete", "pods", "--all", "-n", ns, "--grace-period=0", "--force", check=False)
        if FIGURES:
            FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
            FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2) + "\n")
            print("\nregmirror image-rewrite figures: " + json.dumps(FIGURES))


@contextlib.contextmanager
def webhook_environment(port: int) -> Iterator[None]:
    """What the component sets on the operator, plus the loopback address and URL of this test."""
    env = {"REGMIRROR_WEBHOOK": "on", "REGMIRROR_WEBHOOK_PORT": str(port), "REGMIRROR_WEBHOOK_ADDRESS": "127.0.0.1",
           "REGMIRROR_WEBHOOK_URL": f"https://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def operator(controlplane: cp.ControlPlane, component: None,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[test_operator.Operator]:
    port = cp.free_port()
    with webhook_environment(port), \
            test_operator.running_operator(controlplane, tmp_path_factory.mktemp("operator")) as op:
        test_operator.eventually(lambda: client_configs(controlplane),
                                 until=lambda configs: all(c.get("url", "").startswith(f"https://127.0.0.1:{port}/")
                                                           and c.get("caBundle") for c in configs),
                                 timeout=30, what="the operator's clientConfig in the webhook configuration")
        yield op


@pytest.fixture(scope="module")
def mirrors(controlplane: cp.ControlPlane, operator: test_operator.Operator) -> Iterator[None]:
    names = ["rewrite-quay", "rewrite-docker-hub", "no-rewrite-ghcr"]
    test_operator.apply(controlplane, names[0], "quay.io", "https://quay.tencentcloudcr.com", rewriteImages=True)
    test_operator.apply(controlplane, names[1], "docker.io", "https://mirror.gcr.io", rewriteImages=True)
    test_operator.apply(controlplane, names[2], "ghcr.io", "https://ghcr.example.com")
    test_operator.eventually(lambda: test_operator.published(controlplane), until=lambda p: set(names) <= set(p),
                             timeout=30, what="the RegistryMirrors published")
    try:
        yield
    finally:
        controlplane.kubectl("delete", "registrymirrors", *names, "--ignore-not-found", "--wait", "--timeout=20s")


def client_configs(plane: cp.ControlPlane) -> list[dict[str, Any]]:
    done = plane.kubectl("get", "mutatingwebhookconfiguration", CONFIGURATION, "-o", "json", check=False)
    return [w["clientConfig"] for w in json.loads(done.stdout)["webhooks"]] if done.returncode == 0 else []


_pods = iter(range(1, 10_000))


def create_pod(plane: cp.ControlPlane, ns: str, *containers: dict[str, Any],
               init: tuple[dict[str, Any], ...] = ()) -> tuple[dict[str, Any], float]:
    """``kubectl create`` a Pod; returns it as stored, and how long the create took (seconds)."""
    spec: dict[str, Any] = {"containers": list(containers)}
    if init:
        spec["initContainers"] = list(init)
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{next(_pods)}", "namespace": ns},
            "spec": spec}
    started = time.monotonic()
    done = plane.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(body))
    took = time.monotonic() - started
    return json.loads(done.stdout), took


def api_create(plane: cp.ControlPlane, ns: str, image: str = "quay.io/x/y:1",
               dry_run: bool = False) -> tuple[dict[str, Any], float]:
    """The same create as one HTTPS request (no kubectl process to start): the apiserver's own time."""
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{next(_pods)}", "namespace": ns},
            "spec": {"containers": [{"name": "app", "image": image}]}}
    started = time.monotonic()
    status, pod = plane.request("POST", f"/api/v1/namespaces/{ns}/pods" + ("?dryRun=All" if dry_run else ""), body)
    took = time.monotonic() - started
    assert status == 201, pod
    return pod, took


def images(pod: dict[str, Any]) -> dict[str, str]:
    spec = pod["spec"]
    return {c["name"]: c["image"] for field in ("initContainers", "containers") for c in spec.get(field) or []}


def rewritten(pod: dict[str, Any]) -> dict[str, str] | None:
    text = (pod["metadata"].get("annotations") or {}).get(ANNOTATION)
    return json.loads(text) if text else None


def test_a_quay_image_is_stored_with_the_mirrors_name_and_the_pod_says_so(
        controlplane: cp.ControlPlane, mirrors: None) -> None:
    pod, took = create_pod(controlplane, ON, {"name": "app", "image": "quay.io/x/y:1"},
                           {"name": "sidecar", "image": "ghcr.io/a/b:2"},
                           init=({"name": "setup", "image": "busybox:1.36"},))
    assert images(pod) == {"setup": "mirror.gcr.io/library/busybox:1.36", "app": "quay.tencentcloudcr.com/x/y:1",
                           "sidecar": "ghcr.io/a/b:2"}
    assert rewritten(pod) == {"app": "quay.io/x/y:1 -> quay.tencentcloudcr.com/x/y:1",
                              "setup": "busybox:1.36 -> mirror.gcr.io/library/busybox:1.36"}
    stored = json.loads(controlplane.kubectl("get", "pod", pod["metadata"]["name"], "-n", ON, "-o", "json").stdout)
    assert images(stored) == images(pod)
    FIGURES.setdefault("create_seconds_webhook_up", []).append(round(took, 3))


def test_an_unlabelled_namespace_and_pull_policy_never_are_left_alone(
        controlplane: cp.ControlPlane, mirrors: None) -> None:
    pod, took = create_pod(controlplane, OFF, {"name": "app", "image": "quay.io/x/y:1"})
    assert images(pod) == {"app": "quay.io/x/y:1"} and rewritten(pod) is None
    FIGURES.setdefault("create_seconds_namespace_not_selected", []).append(round(took, 3))
    pod, _ = create_pod(controlplane, ON, {"name": "app", "image": "quay.io/x/y:1", "imagePullPolicy": "Never"})
    assert images(pod) == {"app": "quay.io/x/y:1"} and rewritten(pod) is None


def test_creates_with_the_webhook_up_are_quick(controlplane: cp.ControlPlane, mirrors: None) -> None:
    times = [create_pod(controlplane, ON, {"name": "app", "image": "quay.io/x/y:1"})[1] for _ in range(5)]
    baseline = [create_pod(controlplane, OFF, {"name": "app", "image": "quay.io/x/y:1"})[1] for _ in range(5)]
    FIGURES["create_seconds_webhook_up"] = FIGURES.get("create_seconds_webhook_up", []) + [round(t, 3) for t in times]
    FIGURES["create_seconds_namespace_not_selected"] = (FIGURES.get("create_seconds_namespace_not_selected", [])
                                                        + [round(t, 3) for t in baseline])
    assert statistics.median(times) < 2.0, times
    up = [api_create(controlplane, ON) for _ in range(10)]
    assert all(images(pod) == {"app": "quay.tencentcloudcr.com/x/y:1"} for pod, _ in up)
    FIGURES["api_create_seconds_webhook_up"] = [round(t, 3) for _, t in up]
    FIGURES["api_create_seconds_namespace_not_selected"] = [round(api_create(controlplane, OFF)[1], 3)
                                                            for _ in range(10)]


def test_kubectl_debug_gets_the_mirrors_name_for_the_ephemeral_container_it_adds(
        controlplane: cp.ControlPlane, mirrors: None) -> None:
    pod, _ = create_pod(controlplane, ON, {"name": "app", "image": "ghcr.io/a/b:2"})
    name = pod["metadata"]["name"]
    for image, container in (("quay.io/x/tools:1", "debug-1"), ("busybox:1.36", "debug-2")):
        controlplane.kubectl("debug", name, "-n", ON, f"--image={image}", f"--container={container}",
                             "--attach=false", "--profile=general")
    stored = json.loads(controlplane.kubectl("get", "pod", name, "-n", ON, "-o", "json").stdout)
    assert {c["name"]: c["image"] for c in stored["spec"]["ephemeralContainers"]} == {
        "debug-1": "quay.tencentcloudcr.com/x/tools:1", "debug-2": "mirror.gcr.io/library/busybox:1.36"}
    assert stored["spec"]["containers"][0]["image"] == "ghcr.io/a/b:2"


def test_the_operator_logged_no_permission_error_or_traceback(operator: test_operator.Operator,
                                                             mirrors: None) -> None:
    log = operator.log()
    assert "pointed MutatingWebhookConfiguration regmirror-image-rewrite at this operator" in log, log[-3000:]
    for words in ("HTTP 403", "Forbidden", "forbidden", "Traceback", "image rewrite failed"):
        assert words not in log, log[-3000:]


def test_with_the_operator_hung_or_killed_a_pod_is_created_unchanged(
        controlplane: cp.ControlPlane, operator: test_operator.Operator, mirrors: None) -> None:
    """Hung (SIGSTOP: the kernel still accepts connections, nobody answers): the apiserver gives up after the
    webhook's timeout. Killed (SIGKILL, so nothing cleans up the configuration): the connection is refused."""
    assert operator.proc is not None
    pid = operator.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:  # one HTTPS request: the apiserver's own time, without a kubectl process starting on a busy machine
        pod, took = api_create(controlplane, ON)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert images(pod) == {"app": "quay.io/x/y:1"} and rewritten(pod) is None
    FIGURES["create_seconds_operator_hung"] = round(took, 3)
    assert took < TIMEOUT_SECONDS + 2.0, took

    operator.proc.kill()
    operator.proc.wait(timeout=10)
    operator.proc = None
    assert all(c.get("url") for c in client_configs(controlplane))  # still pointing at the dead process
    times = []
    for _ in range(3):
        pod, took = create_pod(controlplane, ON, {"name": "app", "image": "quay.io/x/y:1"},
                               init=({"name": "setup", "image": "busybox:1.36"},))
        assert images(pod) == {"setup": "busybox:1.36", "app": "quay.io/x/y:1"} and rewritten(pod) is None
        times.append(round(took, 3))
    FIGURES["create_seconds_operator_killed"] = times
    assert max(times) < TIMEOUT_SECONDS + 2.0, times
    down = [api_create(controlplane, ON) for _ in range(10)]
    assert all(images(pod) == {"app": "quay.io/x/y:1"} for pod, _ in down)
    FIGURES["api_create_seconds_operator_killed"] = [round(t, 3) for _, t in down]


def test_a_restarted_operator_points_the_webhook_at_its_new_certificate(
        controlplane: cp.ControlPlane, operator: test_operator.Operator, mirrors: None) -> None:
    """Each start makes a new certificate: nobody has to hand the apiserver one."""
    before = {c["caBundle"] for c in client_configs(controlplane)}
    if operator.proc is None:
        operator.start()
    test_operator.eventually(lambda: {c["caBundle"] for c in client_configs(controlplane)},
                             until=lambda now: not now & before, timeout=30, what="a new caBundle")
    # The stored caBundle is not yet the one the apiserver's webhook client holds (it learns it from a watch), and
    # a call it cannot make is ignored: try it with server-side dry runs, which call the webhook and store nothing.
    test_operator.eventually(lambda: images(api_create(controlplane, ON, dry_run=True)[0]),
                             until=lambda found: found == {"app": "quay.tencentcloudcr.com/x/y:1"}, timeout=30,
                             what="the apiserver calling the restarted operator")
    pod, _ = create_pod(controlplane, ON, {"name": "app", "image": "quay.io/x/y:1"})
    assert images(pod) == {"app": "quay.tencentcloudcr.com/x/y:1"}


def test_the_certificate_names_the_service_the_install_calls(controlplane: cp.ControlPlane,
                                                             operator: test_operator.Operator) -> None:
    """In a cluster the apiserver calls the Service and checks the name <service>.<namespace>.svc; here it is
    checked by Python's verifier against the caBundle the operator wrote, at the same listening port."""
    config = client_configs(controlplane)[0]
    port = int(config["url"].split(":")[2].split("/")[0])
    context = ssl.create_default_context(cadata=base64.b64decode(config["caBundle"]).decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="regmirror-operator-webhook.regmirror-system.svc") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_the_crd_refuses_a_rewrite_no_image_name_can_express(controlplane: cp.ControlPlane, installed: str) -> None:
    for registry, mirror, words in (("*", {"url": "https://m.example.com"}, 'cannot rename the images of "*"'),
                                    ("quay.io", {"url": "https://m.example.com/quay"}, "serves images under a name")):
        done = controlplane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", check=False,
                                    input=json.dumps({
                                        "apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror",
                                        "metadata": {"name": "bad-rewrite"},
                                        "spec": {"registry": registry, "mirrors": [mirror], "rewriteImages": True}}))
        assert done.returncode != 0 and words in done.stderr, done.stderr
        with pytest.raises(models.InvalidSpec):  # the operator's model agrees
            models.parse_spec("bad-rewrite", {"registry": registry, "mirrors": [mirror], "rewriteImages": True})
    ok = {"apiVersion": "regmirror.io/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": "good-rewrite"},
          "spec": {"registry": "quay.io", "rewriteImages": True,
                   "mirrors": [{"url": "https://harbor.example.com/v2/quay-proxy", "overridePath": True}]}}
    controlplane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=json.dumps(ok))
    assert models.parse_spec("good-rewrite", ok["spec"]).rewrite_images
