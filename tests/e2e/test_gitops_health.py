"""GitOps health of RegistryMirrors, judged by Argo CD's and Flux's own code on objects the real operator wrote.

- Argo CD: ``argocd/resource_customizations/regmirror.io/RegistryMirror/health.lua`` run by gopher-lua as Argo
  CD runs a health check (``tests/harness/statuscheck.py``): every case of its ``health_test.yaml``, and each
  state the operator really puts a RegistryMirror in, captured from a real kube-apiserver.
- Flux: kstatus (``sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute``, what ``wait: true`` and ``healthChecks``
  use) on the same objects.

The live states are driven as in tests/e2e/test_operator.py: the operator as a real ``kopf run`` process with
its service account's token, node reports written as RegistryMirrorNode objects with Node-bound agent tokens.
Each captured object is checked at once; to refresh the check's ``testdata/`` (and the live cases of
``health_test.yaml``; ``testdata/hand-*.yaml`` are written by hand and kept) from them::

    python -m tests.e2e.test_gitops_health --capture            # into argocd/.../testdata
    python -m tests.e2e.test_gitops_health --capture DIR        # objects only, into DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from regmirror_api import contract
from tests.e2e import test_operator as operator_e2e
from tests.harness import controlplane as cp
from tests.harness import statuscheck
from tests.harness.controlplane import REPO

CHECK = REPO / "argocd" / "resource_customizations" / "regmirror.io" / "RegistryMirror"
HEALTH_LUA = CHECK / "health.lua"
HEALTH_TEST = CHECK / "health_test.yaml"
TESTDATA = CHECK / "testdata"
SNIPPET = REPO / "argocd" / "argocd-cm-patch.yaml"
SNIPPET_KEY = "resource.customizations.health.regmirror.io_RegistryMirror"
FLUX_EXAMPLES = REPO / "examples" / "flux"
CAPTURE_ENV = "REGMIRROR_GITOPS_CAPTURE"
FIGURES_FILE = REPO / ".cache" / "figures" / "gitops.json"
#: Flux's own CRDs for the example's kinds, read from the controllers' Go modules (through the module proxy).
FLUX_CRDS = {
    "github.com/fluxcd/kustomize-controller@v1.10.1":
        "config/crd/bases/kustomize.toolkit.fluxcd.io_kustomizations.yaml",
    "github.com/fluxcd/source-controller@v1.10.1":
        "config/crd/bases/source.toolkit.fluxcd.io_gitrepositories.yaml",
}

NS = contract.NAMESPACE
NODES = {"gitops-a": "a", "gitops-b": "b", "gitops-c": "c"}
FAILURE = "containerd did not come back; rolled back"

#: What kstatus says of each testdata object. failing-nodes is InProgress, not Failed: the operator keeps
#: Reconciling=True and Stalled=False while nodes fail, and kstatus fails only on Stalled=True.
KSTATUS = {
    # The CRD defaults status.observedGeneration to 0, so before the operator writes anything kstatus sees a
    # generation not yet observed: InProgress (with no status at all it would have said Current).
    "unseen": "InProgress",
    "hand-status-defaulted": "InProgress",  # what a CRD default of status.observedGeneration: 0 would change
    "reconciling": "InProgress",
    "failing-nodes": "InProgress",
    "ready": "Current",
    "no-node-selected": "Current",
    "new-generation-unobserved": "InProgress",
    "new-generation-applying": "InProgress",
    "stalled-conflict": "Failed",
}
#: (state, Argo CD, kstatus) of every live check this session, printed at the end.
VERDICTS: list[tuple[str, str, str]] = []


# --- the check's own files, with no cluster ---------------------------------------------------------------


def health_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load(HEALTH_TEST.read_text())["tests"]
    return cases


@pytest.mark.parametrize("open_libs", [False, True], ids=["argocd-cm", "built-in"])
@pytest.mark.parametrize("case", health_cases(), ids=lambda c: Path(c["inputPath"]).stem)
def test_every_health_test_case_passes_in_argo_cds_lua_engine(case: dict[str, Any], open_libs: bool) -> None:
    obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    assert statuscheck.argo_health(HEALTH_LUA, obj, open_libs=open_libs) == case["healthStatus"]


def test_every_testdata_object_has_a_health_case_and_a_kstatus_verdict() -> None:
    files = {p.stem for p in TESTDATA.glob("*.yaml")}
    assert files == {Path(c["inputPath"]).stem for c in health_cases()}
    assert files == set(KSTATUS)


@pytest.mark.parametrize("state", sorted(KSTATUS))
def test_kstatus_on_every_testdata_object(state: str) -> None:
    obj = yaml.safe_load((TESTDATA / f"{state}.yaml").read_text())
    assert statuscheck.kstatus(obj)["status"] == KSTATUS[state]


def test_the_argocd_cm_snippet_embeds_health_lua_exactly() -> None:
    done = subprocess.run([sys.executable, str(REPO / "hack" / "render-argocd-cm.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    snippet = yaml.safe_load(SNIPPET.read_text())
    assert (snippet["kind"], snippet["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    assert snippet["data"] == {SNIPPET_KEY: HEALTH_LUA.read_text()}


def test_the_flux_example_waits_for_the_registrymirrors_with_a_timeout() -> None:
    docs = [d for p in sorted(FLUX_EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    kustomizations = [d for d in docs if d["kind"] == "Kustomization"
                      and d["apiVersion"].startswith("kustomize.toolkit.fluxcd.io/")]
    assert kustomizations, f"no Flux Kustomization in {FLUX_EXAMPLES}"
    for k in kustomizations:
        spec = k["spec"]
        checks = spec.get("healthChecks") or []
        assert spec.get("wait") is True or any(c["kind"] == "RegistryMirror" for c in checks), k
        assert spec.get("timeout") and spec.get("sourceRef") and spec.get("path"), k
        assert spec.get("prune") is not None, k
    sources = {(d["kind"], d["metadata"]["name"]) for d in docs if d["apiVersion"].startswith("source.")}
    for k in kustomizations:
        assert (k["spec"]["sourceRef"]["kind"], k["spec"]["sourceRef"]["name"]) in sources


# --- live objects from the real operator --------------------------------------------------------------------


@pytest.mark.controlplane
def test_the_argocd_cm_snippet_patches_argocd_cm(controlplane: cp.ControlPlane) -> None:
    """The documented `kubectl patch` of an Argo CD install's argocd-cm leaves exactly health.lua in it."""
    controlplane.kubectl("create", "namespace", "argocd", check=False)
    controlplane.kubectl("create", "configmap", "argocd-cm", "-n", "argocd", "--from-literal=url=https://argocd.example")
    try:
        controlplane.kubectl("-n", "argocd", "patch", "configmap", "argocd-cm", "--type", "merge",
                             "--patch-file", str(SNIPPET))
        data = json.loads(controlplane.kubectl("get", "configmap", "argocd-cm", "-n", "argocd", "-o", "json").stdout)
        assert data["data"] == {"url": "https://argocd.example", SNIPPET_KEY: HEALTH_LUA.read_text()}
    finally:
        controlplane.kubectl("delete", "namespace", "argocd", "--wait=false")


def flux_crd(module: str, path: str, workdir: Path) -> str:
    """One CRD file of a Flux controller's module, as `go mod download` verifies it against the checksum DB.

    The download's own "requires go >= ..." complaint is about building the controller, which is not needed."""
    done = subprocess.run(["go", "mod", "download", "-json", module], cwd=workdir, capture_output=True,
                          text=True, timeout=300, check=False)
    zip_path = json.loads(done.stdout or "{}").get("Zip") or ""
    if not Path(zip_path).is_file():
        raise AssertionError(f"go mod download {module} gave no module zip: {done.stdout}{done.stderr}")
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(f"{module}/{path}").decode()


@pytest.mark.controlplane
def test_the_flux_example_is_valid_against_fluxs_own_crds(controlplane: cp.ControlPlane, tmp_path: Path) -> None:
    """Server-side dry run with strict field validation: every field of the example is one Flux knows."""
    names = []
    for module, path in FLUX_CRDS.items():
        crd = flux_crd(module, path, tmp_path)
        names.append(yaml.safe_load(crd)["metadata"]["name"])
        controlplane.kubectl("apply", "--server-side", "-f", "-", input=crd)
    try:
        for name in names:
            controlplane.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")
        controlplane.kubectl("create", "namespace", "flux-system", check=False)
        done = controlplane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(FLUX_EXAMPLES),
                                    check=False)
        assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr
        assert done.stdout.count("(server dry run)") == 3, done.stdout
    finally:
        controlplane.kubectl("delete", "crd", *names, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def nodes(controlplane: cp.ControlPlane, installed: str) -> Iterator[list[str]]:
    # The counts ("0/3") in the captured objects assume these are the only Nodes.
    with operator_e2e.only_these_nodes(controlplane, NODES) as names:
        yield names


@pytest.fixture(scope="module")
def operator(controlplane: cp.ControlPlane, installed: str, nodes: list[str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[operator_e2e.Operator]:
    with operator_e2e.running_operator(controlplane, tmp_path_factory.mktemp("operator")) as op:
        yield op
    if VERDICTS:
        width = max(len(s) for s, _, _ in VERDICTS)
        print("\n[gitops] state" + " " * (width - 5) + "  Argo CD      kstatus")
        for state, argo, kstat in VERDICTS:
            print(f"[gitops] {state:{width}}  {argo:11}  {kstat}")
        # For hack/test.sh to print (pytest keeps a passing test's output to itself).
        figures = {"verdicts": {s: {"argocd": a, "kstatus": k} for s, a, k in VERDICTS}}
        if "build" in statuscheck.FIGURES:
            figures["status_checkers_build_seconds"] = round(statuscheck.FIGURES["build"], 1)
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        FIGURES_FILE.write_text(json.dumps(figures, indent=2) + "\n")


@pytest.fixture
def mirrors(controlplane: cp.ControlPlane, operator: operator_e2e.Operator) -> Iterator[list[str]]:
    """Names of RegistryMirrors to delete after the test; node reports go too, and the operator stayed clean."""
    names: list[str] = []
    yield names
    if names:
        controlplane.kubectl("delete", "registrymirrors", *names, "--ignore-not-found", "--wait", "--timeout=20s")
    operator_e2e._node_reports.clear()
    controlplane.kubectl("delete", "registrymirrornodes", "--all", "--wait", "--timeout=20s")
    log = operator.log()
    for words in ("HTTP 403", "Forbidden", "forbidden", "Traceback"):
        assert words not in log, log[-4000:]


def captured(plane: cp.ControlPlane, name: str) -> dict[str, Any]:
    """The object as `kubectl get -o json` shows it, without managedFields (noise to a health check)."""
    obj: dict[str, Any] = json.loads(plane.kubectl("get", "registrymirror", name, "-o", "json").stdout)
    obj["metadata"].pop("managedFields", None)
    return obj


def judge(state: str, obj: dict[str, Any], argo: dict[str, str]) -> None:
    """Argo CD's and kstatus's verdicts on a live object are ``argo`` and ``KSTATUS[state]``; capture it if
    asked (``$REGMIRROR_GITOPS_CAPTURE``)."""
    target = os.environ.get(CAPTURE_ENV)
    if target:
        save(Path(target), state, obj, argo)
    got_argo = statuscheck.argo_health(HEALTH_LUA, obj)
    got_kstatus = statuscheck.kstatus(obj)
    VERDICTS.append((state, got_argo["status"], got_kstatus["status"]))
    print(f"\n[gitops] {state}: Argo CD {got_argo}; kstatus {got_kstatus}")
    assert got_argo == argo
    assert got_kstatus["status"] == KSTATUS[state], got_kstatus


def save(folder: Path, state: str, obj: dict[str, Any], argo: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{state}.yaml").write_text(yaml.safe_dump(obj, sort_keys=False, width=1000))
    if folder.resolve() != TESTDATA.resolve():
        return
    # The live expectation becomes this file's case in health_test.yaml (hand-written cases are kept).
    doc = yaml.safe_load(HEALTH_TEST.read_text()) if HEALTH_TEST.exists() else {"tests": []}
    path = f"testdata/{state}.yaml"
    cases = [c for c in doc["tests"] if c["inputPath"] != path]
    cases.append({"healthStatus": dict(argo), "inputPath": path})
    doc["tests"] = sorted(cases, key=lambda c: c["inputPath"])
    HEALTH_TEST.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def wait_status(plane: cp.ControlPlane, name: str, until: Any, what: str) -> dict[str, Any]:
    operator_e2e.eventually(lambda: until(captured(plane, name)), what=what, timeout=30)
    return captured(plane, name)


@pytest.mark.controlplane
def test_unseen_and_reconciling_registrymirrors_are_progressing(controlplane: cp.ControlPlane,
                                                                operator: operator_e2e.Operator,
                                                                mirrors: list[str]) -> None:
    mirrors.append("gitops-quay")
    operator.stop()
    try:
        operator_e2e.apply(controlplane, "gitops-quay", "quay.io", "https://quay.tencentcloudcr.com")
        unseen = captured(controlplane, "gitops-quay")
        assert unseen["status"] == {"observedGeneration": 0}, "the CRD's default, before the operator's first write"
        judge("unseen", unseen, {"status": "Progressing",
                                 "message": "Waiting for the operator to observe generation 1"})
    finally:
        operator.start()
    obj = wait_status(controlplane, "gitops-quay", lambda o: o.get("status", {}).get("observedGeneration") == 1,
                      "the first status")
    assert obj["status"]["ready"] == "0/3" and conditions(obj)["Reconciling"]["status"] == "True"
    judge("reconciling", obj, {"status": "Progressing", "message": "0/3 nodes applied generation 1"})


@pytest.mark.controlplane
def test_failing_nodes_are_degraded_and_ready_is_healthy(controlplane: cp.ControlPlane,
                                                        operator: operator_e2e.Operator, mirrors: list[str]) -> None:
    mirrors.append("gitops-quay")
    operator_e2e.apply(controlplane, "gitops-quay", "quay.io", "https://quay.tencentcloudcr.com")
    wait_status(controlplane, "gitops-quay", lambda o: o.get("status", {}).get("ready") == "0/3", "0/3")
    operator_e2e.report_as_agent(controlplane, "gitops-quay", "gitops-a", 1)
    operator_e2e.report_as_agent(controlplane, "gitops-quay", "gitops-b", 1, "Failed", FAILURE)
    obj = wait_status(controlplane, "gitops-quay", lambda o: o.get("status", {}).get("nodes", {}).get("failed") == 1,
                      "the failure counted")
    message = obj["status"]["message"]
    assert message == f"1 of 3 nodes failed generation 1 (1 applied): gitops-b: {FAILURE}"
    assert (conditions(obj)["Ready"]["status"], conditions(obj)["Ready"]["reason"]) == ("False", "NodesFailed")
    assert conditions(obj)["Stalled"]["status"] == "False"
    judge("failing-nodes", obj, {"status": "Degraded", "message": message})

    operator_e2e.report_as_agent(controlplane, "gitops-quay", "gitops-b", 1)
    operator_e2e.report_as_agent(controlplane, "gitops-quay", "gitops-c", 1)
    obj = wait_status(controlplane, "gitops-quay", lambda o: conditions(o).get("Ready", {}).get("status") == "True",
                      "Ready")
    judge("ready", obj, {"status": "Healthy", "message": "3/3 nodes run generation 1"})

    # A new generation: Progressing until the operator has seen it, and then until the nodes apply it.
    operator.stop()
    try:
        controlplane.kubectl("patch", "registrymirror", "gitops-quay", "--type=merge", "-p",
                             json.dumps({"spec": {"mirrors": [{"url": "https://quay-mirror.example.com"}]}}))
        obj = captured(controlplane, "gitops-quay")
        assert (obj["metadata"]["generation"], obj["status"]["observedGeneration"]) == (2, 1)
        assert conditions(obj)["Ready"]["status"] == "True"  # still generation 1's status
        judge("new-generation-unobserved", obj, {
            "status": "Progressing",
            "message": "Waiting for the operator to observe generation 2 (status is of generation 1)"})
    finally:
        operator.start()
    obj = wait_status(controlplane, "gitops-quay", lambda o: o["status"].get("observedGeneration") == 2,
                      "generation 2 observed")
    judge("new-generation-applying", obj, {"status": "Progressing", "message": "0/3 nodes applied generation 2"})


@pytest.mark.controlplane
def test_a_registrymirror_selecting_no_node_is_healthy(controlplane: cp.ControlPlane,
                                                       operator: operator_e2e.Operator, mirrors: list[str]) -> None:
    mirrors.append("gitops-nowhere")
    operator_e2e.apply(controlplane, "gitops-nowhere", "gcr.io", "https://gcr-mirror.example.com",
                       nodeSelector={"matchLabels": {"pool": "none"}})
    obj = wait_status(controlplane, "gitops-nowhere", lambda o: o.get("status", {}).get("ready") == "0/0", "0/0")
    judge("no-node-selected", obj, {"status": "Healthy", "message": "no node matches nodeSelector"})


@pytest.mark.controlplane
def test_the_younger_of_two_registrymirrors_for_one_registry_is_degraded(
        controlplane: cp.ControlPlane, operator: operator_e2e.Operator, mirrors: list[str]) -> None:
    mirrors += ["gitops-ghcr", "gitops-ghcr-again"]
    operator_e2e.apply(controlplane, "gitops-ghcr", "ghcr.io", "https://ghcr-mirror.example.com")
    operator_e2e.eventually(lambda: "gitops-ghcr" in operator_e2e.published(controlplane), what="published")
    time.sleep(1.1)  # creationTimestamp has a resolution of one second
    operator_e2e.apply(controlplane, "gitops-ghcr-again", "ghcr.io", "https://other.example.com")
    obj = wait_status(controlplane, "gitops-ghcr-again",
                      lambda o: conditions(o).get("Stalled", {}).get("status") == "True", "Stalled")
    message = conditions(obj)["Stalled"]["message"]
    assert "already mirrored by RegistryMirror 'gitops-ghcr'" in message
    judge("stalled-conflict", obj, {"status": "Degraded", "message": message})


def main(argv: list[str]) -> int:
    """``--capture [DIR]``: run the live tests and write each captured object (default: the check's testdata,
    whose health_test.yaml cases follow)."""
    if not argv or argv[0] != "--capture" or len(argv) > 2:
        print(main.__doc__, file=sys.stderr)
        return 2
    target = Path(argv[1]).resolve() if len(argv) == 2 else TESTDATA
    env = {**os.environ, CAPTURE_ENV: str(target)}
    return subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", "-m",
                            "controlplane", __file__], cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
