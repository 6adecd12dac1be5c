"""`regmirror apply/reset` on real containerd 1.6 nodes, pulling through a real local registry.

No network reaches quay.io or Docker Hub here: a pull that succeeds came through the mirror regmirror wrote.
Each node runs its own containerd in a private mount namespace where the node root's ``/etc/containerd`` is
``/etc/containerd``, so config.toml names ``/etc/containerd/certs.d`` exactly as on a real node.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from regmirror_agent import engine
from regmirror_agent.restarting import Host
from regmirror_api import models
from tests.harness.containerd import ContainerdNode
from tests.harness.fixtures import require_crictl
from tests.harness.product import contents, regmirror, snapshot, with_broken_config
from tests.harness.proofs import HUB_IMAGE, QUAY_IMAGE, prove_apply_pull_reset
from tests.harness.registry import Registry

pytestmark = pytest.mark.integration



def apply_args(node: ContainerdNode, registry: Registry, *extra: str) -> list[str]:
    return ["apply", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command(),
            "--health-timeout", "20",
            "--mirror", f"quay.io={registry.url}", "--mirror", f"docker.io={registry.url}", *extra]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mode", ["hosts", "inline"])
def test_apply_pull_through_mirror_then_reset(containerd_node_factory, registry: Registry, version: int,
                                              mode: str) -> None:
    require_crictl()
    node = containerd_node_factory(version, start=True)
    prove_apply_pull_reset(node, registry, regmirror, apply_args(node, registry, "--mode", mode))


def test_moving_to_hosts_mode_keeps_the_nodes_own_inline_mirror_working(containerd_node_factory,
                                                                        registry: Registry) -> None:
    require_crictl()
    own = "registry.corp.internal"
    node = containerd_node_factory(1, mirrors={own: [registry.url]}, start=True)
    assert node.crictl_pull(f"{own}/k8scsi/csi-resizer:v0.5.0").returncode == 0
    assert node.crictl("rmi", f"{own}/k8scsi/csi-resizer:v0.5.0").returncode == 0

    result = regmirror(*apply_args(node, registry))
    assert result.returncode == 0, result.stderr
    assert "moved the node's own inline registry mirrors" in result.stdout
    ok, detail = node.wait_cri()
    assert ok, detail  # inline mirrors beside config_path would have failed the CRI plugin
    assert (node.certs_dir / own / "hosts.toml").exists()
    for image in (f"{own}/k8scsi/csi-resizer:v0.5.0", QUAY_IMAGE):
        pulled = node.crictl_pull(image)
        assert pulled.returncode == 0, pulled.stderr


def test_hosts_toml_change_needs_no_restart(containerd_node_factory, registry: Registry) -> None:
    require_crictl()
    node = containerd_node_factory(2, start=True)
    first = regmirror("apply", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command(),
                      "--mirror", f"quay.io={registry.url}")
    assert first.returncode == 0, first.stderr
    pid = node.pid
    second = regmirror(*apply_args(node, registry))
    assert second.returncode == 0, second.stderr
    assert "restart" not in second.stdout
    assert node.pid == pid
    pulled = node.crictl_pull(HUB_IMAGE)
    assert pulled.returncode == 0, pulled.stderr


def test_tls_mirror_with_ca_bundle(containerd_node_factory, tls_registry: Registry, tmp_path: Path) -> None:
    require_crictl()
    node = containerd_node_factory(2, start=True)
    ca = "\n".join("      " + line for line in tls_registry.ca_pem.strip().splitlines())
    doc = tmp_path / "mirrors.yaml"
    doc.write_text(f"""apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata:
  name: quay-io
spec:
  registry: quay.io
  mirrors:
  - url: {tls_registry.url}
    caBundle: |
{ca}
""")
    result = regmirror("apply", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command(),
                       "-f", str(doc))
    assert result.returncode == 0, result.stderr
    pulled = node.crictl_pull(QUAY_IMAGE)
    assert pulled.returncode == 0, pulled.stderr + node.log_tail()


def test_restart_failure_rolls_back_to_previous_files(containerd_node_factory, registry: Registry) -> None:
    """A config.toml the CRI plugin refuses (inline mirrors beside config_path, which the planner never
    writes, so the test hands the engine that plan) is detected after the restart and rolled back."""
    node = containerd_node_factory(2, start=True)
    before = contents(node.etc_dir)
    settings = engine.Settings(root=str(node.node_root), restart="command:" + node.ctl_command(),
                               health_timeout=20, host=Host())
    plan, runtime = engine.plan([models.parse_cli_mirror(f"quay.io={registry.url}")], settings)
    bad_plan = with_broken_config(plan, '\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."ghcr.io"]\n'
                                        '  endpoint = ["https://ghcr.mirror.example"]\n')

    with pytest.raises(engine.EngineError) as exc:
        engine.execute(bad_plan, runtime, settings)
    message = str(exc.value)
    assert "`mirrors` cannot be set when `config_path` is provided" in message
    assert "put the previous files back" in message and "healthy again" in message
    assert contents(node.etc_dir) == before
    assert not (node.node_root / "var/lib/regmirror/state.json").exists()
    ok, detail = node.wait_cri()
    assert ok, detail


def test_failed_restart_command_changes_nothing(containerd_node_factory, registry: Registry) -> None:
    node = containerd_node_factory(2, start=True)
    def node_files(p: Path) -> bool:
        return p.name != "containerd.log"

    before = contents(node.node_root, node_files)
    result = regmirror("apply", "--root", str(node.node_root), "--restart", "command:exit 3",
                       "--mirror", f"quay.io={registry.url}")
    assert result.returncode == 1
    assert "exited 3" in result.stderr and "put the previous files back" in result.stderr
    assert contents(node.node_root, node_files) == before


def test_a_restart_command_that_restarts_nothing_is_caught_and_rolled_back(containerd_node_factory,
                                                                          registry: Registry) -> None:
    """Seen with a restart command that does nothing: it exits 0, the CRI plugin answers ok, and the node said
    Applied while containerd kept its old configuration (config_path unset) and pulls bypassed the mirror.
    containerd reads config.toml only at start, so a restart that left the same process serving its socket is
    refused and the files are put back."""
    node = containerd_node_factory(2, start=True)

    def node_files(p: Path) -> bool:
        return p.name != "containerd.log"

    before, pid = contents(node.node_root, node_files), node.pid
    result = regmirror("apply", "--root", str(node.node_root), "--restart", "command:true",
                       "--mirror", f"quay.io={registry.url}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "containerd was not restarted: the same process" in result.stderr, result.stderr
    assert "put the previous files back" in result.stderr
    assert contents(node.node_root, node_files) == before
    assert node.pid == pid


def test_dry_run_prints_the_diff_and_writes_nothing(containerd_node_factory, registry: Registry) -> None:
    node = containerd_node_factory(2)
    before = snapshot(node.node_root)
    result = regmirror(*apply_args(node, registry, "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert "+++ b/etc/containerd/certs.d/quay.io/hosts.toml" in result.stdout
    assert '+      config_path = "/etc/containerd/certs.d"' in result.stdout or "config_path" in result.stdout
    assert snapshot(node.node_root) == before


def test_containerd_itself_rejects_a_bad_config_before_anything_is_written(tmp_path: Path) -> None:
    """`containerd config dump` runs on the planned file: a version only containerd can judge is caught."""
    root = tmp_path / "node"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text('version = 2\noom_score = "high"\n')
    before = contents(root)
    result = regmirror("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example")
    assert result.returncode == 1
    assert "containerd rejects the planned /etc/containerd/config.toml" in result.stderr
    assert contents(root) == before


def test_written_files_keep_mode_and_owner(tmp_path: Path) -> None:
    root = tmp_path / "node"
    cfg = root / "etc/containerd/config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("version = 2\n")
    os.chmod(cfg, 0o640)
    os.chown(cfg, 1234, 5678)
    result = regmirror("apply", "--root", str(root), "--restart", "never", "--mirror", "quay.io=https://m.example")
    assert result.returncode == 0, result.stderr
    st = cfg.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 1234, 5678)
