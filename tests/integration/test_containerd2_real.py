"""`regmirror apply/reset` on real containerd 2.x nodes (config schema 3), pulling through a real local registry.

The 1.6 proof (test_node_engine_real.py) run on containerd 2.x, built from its Go module into
``.cache/bin/containerd2`` by hack/build-control-plane.sh. A 2.x node is one whose ``containerd`` and ``ctr`` are
2.x, so regmirror runs with that folder first on ``PATH``: its ``containerd --config X config dump`` check and its
CRI health check (``ctr --address SOCK plugins ls``) talk to 2.x, as they would on such a node.

No network reaches quay.io or Docker Hub here: a pull that succeeds came through the mirror regmirror wrote.
"""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest

from regmirror_agent import engine
from regmirror_agent.restarting import Host
from regmirror_api import models
from tests.harness.containerd import ContainerdNode
from tests.harness.fixtures import ContainerdNodeFactory, require_crictl
from tests.harness.product import contents, with_broken_config
from tests.harness.product import regmirror as run_regmirror
from tests.harness.proofs import QUAY_IMAGE, prove_apply_pull_reset
from tests.harness.registry import Registry

pytestmark = pytest.mark.integration

IMAGES_PLUGIN = "io.containerd.cri.v1.images"
#: The list EKS-style nodes set, and the built-in default of 2.x when config_path is empty and there are no mirrors.
TWO_DIRS = "/etc/containerd/certs.d:/etc/docker/certs.d"


def regmirror(node: ContainerdNode, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as on a 2.x node: 2.x's containerd and ctr first on PATH."""
    return run_regmirror(*args, env=node.env())


def apply_args(node: ContainerdNode, registry: Registry) -> list[str]:
    return ["apply", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command(),
            "--health-timeout", "20",
            "--mirror", f"quay.io={registry.url}", "--mirror", f"docker.io={registry.url}"]


def registry_table(node: ContainerdNode) -> dict[str, object]:
    doc = tomllib.loads(node.config_path.read_text())
    assert doc["version"] == 3, "the file keeps its schema"
    return doc["plugins"][IMAGES_PLUGIN].get("registry", {})


def node_2x(factory: ContainerdNodeFactory, config_path: str) -> ContainerdNode:
    """A started containerd 2.x node with a version-3 config.toml whose CRI plugin is up."""
    node = factory(3, flavor="2.x", start=True, config_path=config_path)
    assert re.search(r"Server:\s+Version:\s+v?2\.", node.ctr("version", timeout=10).stdout), "not a 2.x node"
    ok, detail = node.wait_cri()
    assert ok, detail
    return node


def test_v3_apply_pull_through_mirror_then_reset(containerd_node_factory: ContainerdNodeFactory,
                                                 registry: Registry) -> None:
    require_crictl()
    # config_path = '' is what `containerd config default` of 2.x writes.
    node = node_2x(containerd_node_factory, "")

    def schema_3_kept_and_both_cri_plugins_ok() -> None:
        assert re.search(r"^version = 3$", node.config_path.read_text(), re.MULTILINE)
        assert registry_table(node)["config_path"] == "/etc/containerd/certs.d"
        assert node.plugins().get(("io.containerd.grpc.v1", "cri")) == "ok"
        assert node.plugins().get(("io.containerd.cri.v1", "images")) == "ok"

    prove_apply_pull_reset(node, registry, lambda *a: regmirror(node, *a), apply_args(node, registry),
                           agent="containerd/v2", check_applied=schema_3_kept_and_both_cri_plugins_ok)


def test_v3_config_path_list_becomes_one_directory_so_cri_pulls_use_the_mirror(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry) -> None:
    """containerd 2.1+ pulls through the transfer service, which takes ``config_path`` as ONE directory: with
    ``/etc/containerd/certs.d:/etc/docker/certs.d`` it looks for ``.../certs.d:/etc/docker/certs.d/quay.io`` and
    finds nothing (containerd #12415). First the node as it is: a correct hosts.toml in the first directory is
    ignored by a CRI pull. Then regmirror, seeing containerd 2.x, sets ``config_path`` to that directory alone and
    says so; the pull goes through the mirror; reset gives the list back byte for byte."""
    require_crictl()
    node = node_2x(containerd_node_factory, TWO_DIRS)
    node.write_hosts_toml("quay.io", registry.url)  # the node's own mirror, in the first directory
    before = contents(node.etc_dir)
    since = registry.mark()
    assert node.crictl_pull(QUAY_IMAGE).returncode != 0, "containerd 2.x used a config_path list: update the notes"
    assert registry.requests_for("/v2/k8scsi/csi-resizer/", since=since) == 0
    assert node.ctr_pull(QUAY_IMAGE).returncode == 0, "the node's own hosts.toml is valid on its own"

    result = regmirror(node, *apply_args(node, registry))
    assert result.returncode == 0, result.stderr
    assert "ignores for CRI pulls" in result.stdout and "#12415" in result.stdout
    assert registry_table(node)["config_path"] == "/etc/containerd/certs.d"
    ok, detail = node.wait_cri()
    assert ok, detail
    since = registry.mark()
    pulled = node.crictl_pull(QUAY_IMAGE)
    assert pulled.returncode == 0, pulled.stderr
    assert registry.requests_for("/v2/k8scsi/csi-resizer/manifests/", since=since, agent="containerd/v2") >= 1

    reset = regmirror(node, "reset", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command())
    assert reset.returncode == 0, reset.stderr
    assert contents(node.etc_dir) == before
    assert registry_table(node)["config_path"] == TWO_DIRS


def test_v3_broken_cri_plugin_is_detected_and_rolled_back(containerd_node_factory: ContainerdNodeFactory,
                                                          registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """regmirror's health check on 2.x: inline mirrors beside config_path (which the planner never writes, so the
    test hands the engine that plan) fail the ``io.containerd.cri.v1 images`` plugin, and with it
    ``io.containerd.grpc.v1 cri``, whose error carries the images plugin's message. The engine sees it in
    ``ctr plugins ls`` and puts the node's files back."""
    node = node_2x(containerd_node_factory, "")
    monkeypatch.setenv("PATH", node.env()["PATH"])  # the engine runs in this process: 2.x's ctr and containerd
    before = contents(node.etc_dir)
    settings = engine.Settings(root=str(node.node_root), restart="command:" + node.ctl_command(),
                               health_timeout=20, host=Host())
    plan, runtime = engine.plan([models.parse_cli_mirror(f"quay.io={registry.url}")], settings)
    bad_plan = with_broken_config(plan, f"\n[plugins.'{IMAGES_PLUGIN}'.registry.mirrors.'ghcr.io']\n"
                                        "  endpoint = ['https://ghcr.mirror.example']\n")

    with pytest.raises(engine.EngineError) as exc:
        engine.execute(bad_plan, runtime, settings)
    message = str(exc.value)
    assert ("unable to load CRI image service plugin dependency: invalid cri image config: "
            "`mirrors` cannot be set when `config_path` is provided") in message
    assert "put the previous files back" in message and "healthy again" in message
    assert contents(node.etc_dir) == before
    ok, detail = node.wait_cri()
    assert ok, detail
