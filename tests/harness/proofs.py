"""The node engine's whole promise on one real containerd node, as one reusable proof.

apply -> containerd restarted and healthy -> the original image names pull through the mirror (the registry log
shows containerd asking) -> an identical apply writes nothing -> reset gives back the node's own files exactly
-> the mirror is no longer used. The 1.6 and 2.x integration tests run it on their own nodes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from tests.harness.containerd import ContainerdNode
from tests.harness.product import contents, snapshot
from tests.harness.registry import Registry

QUAY_IMAGE = "quay.io/k8scsi/csi-resizer:v0.5.0"
HUB_IMAGE = "docker.io/library/busybox:1.36"

Run = Callable[..., subprocess.CompletedProcess[str]]


def prove_apply_pull_reset(node: ContainerdNode, registry: Registry, run: Run, apply_argv: Sequence[str], *,
                           agent: str = "containerd",
                           check_applied: Callable[[], None] | None = None) -> None:
    """``run(*argv)`` runs regmirror; ``agent`` is how this containerd names itself to the registry."""
    before = contents(node.etc_dir)
    for image in (QUAY_IMAGE, HUB_IMAGE):
        assert node.crictl_pull(image).returncode != 0, "without a mirror nothing can serve this image"

    first_pid = node.pid
    result = run(*apply_argv)
    assert result.returncode == 0, result.stderr
    assert "restarted and healthy" in result.stdout
    assert node.pid != first_pid
    ok, detail = node.wait_cri()
    assert ok, detail
    if check_applied:
        check_applied()

    since = registry.mark()
    for image in (QUAY_IMAGE, HUB_IMAGE):
        pulled = node.crictl_pull(image)
        assert pulled.returncode == 0, pulled.stderr + node.log_tail()
    assert registry.requests_for("/v2/k8scsi/csi-resizer/manifests/", since=since, agent=agent) >= 1
    assert registry.requests_for("/v2/library/busybox/manifests/", since=since, agent=agent) >= 1

    # A second identical apply writes nothing: same bytes, same mtimes, no restart.
    root_before = snapshot(node.node_root)
    pid = node.pid
    again = run(*apply_argv)
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    assert snapshot(node.node_root) == root_before
    assert node.pid == pid

    reset = run("reset", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command())
    assert reset.returncode == 0, reset.stderr
    assert contents(node.etc_dir) == before, "reset must give back the node's own files exactly"
    assert not (node.node_root / "var/lib/regmirror/state.json").exists()
    ok, detail = node.wait_cri()
    assert ok, detail
    assert node.crictl("rmi", QUAY_IMAGE).returncode == 0
    assert node.crictl_pull(QUAY_IMAGE).returncode != 0, "after reset the mirror must no longer be used"
