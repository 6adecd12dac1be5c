"""`regmirror apply --credentials FILE` on real containerd 1.6 and 2.x, through a mirror that demands a login.

The mirror is the loopback docker-registry with htpasswd auth (bcrypt): without the login it answers 401, and
containerd (which sends a node's pull secrets only to the registry they were issued for) falls back to quay.io,
which no network reaches here. So a pull of the original name that succeeds came through the mirror with the
credentials regmirror wrote. Then the registry's password changes and the credentials file with it: only the
hosts.toml changes, the same containerd process serves the next pull.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.containerd import ContainerdNode, flavor_dir
from tests.harness.controlplane import REPO
from tests.harness.fixtures import ContainerdNodeFactory, require_crictl
from tests.harness.product import regmirror
from tests.harness.proofs import QUAY_IMAGE
from tests.harness.registry import Registry

pytestmark = pytest.mark.integration

FIGURES_FILE = REPO / ".cache" / "figures" / "credentials-cli.json"
FIGURES: dict[str, Any] = {}
USER = "mirror-user"


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    reg = Registry(tmp_path_factory.mktemp("auth-registry"), users={USER: "first-Secret-pw"})
    try:
        reg.push("k8scsi/csi-resizer", "v0.5.0")
        yield reg
    finally:
        reg.close()
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")
        print("\nregmirror credentials (CLI) figures: " + json.dumps(FIGURES))


def write_auths(path: Path, host: str, password: str) -> Path:
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}, "quay.io": {"auth": "bm90OnVzZWQ="}}}))
    path.chmod(0o600)
    return path


def secrets_of(password: str) -> list[str]:
    return [password, base64.b64encode(f"{USER}:{password}".encode()).decode()]


def leaks(root: Path, secrets: list[str], *, allowed: Path) -> list[str]:
    """Files under ``root`` other than ``allowed`` holding any of ``secrets``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != allowed:
            data = path.read_bytes()
            found += [f"{path}: {s[:4]}..." for s in secrets if s.encode() in data]
    return found


@pytest.mark.parametrize("flavor", ["1.6", "2.x"])
def test_cli_credentials_pull_through_a_mirror_that_demands_them_and_rotate(
        containerd_node_factory: ContainerdNodeFactory, auth_registry: Registry, tmp_path: Path, flavor: str) -> None:
    require_crictl()
    if flavor == "2.x":
        assert (flavor_dir("2.x") / "containerd").exists(), "containerd 2.x is built by hack/install-deps.sh"
        node: ContainerdNode = containerd_node_factory(3, flavor="2.x", start=True, config_path="")
    else:
        node = containerd_node_factory(2, start=True)
    figures: dict[str, Any] = FIGURES.setdefault(flavor, {})
    run = lambda *a: regmirror(*a, env=node.env())  # noqa: E731 - the node's own containerd and ctr first
    base = ["apply", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command(),
            "--health-timeout", "20", "--mirror", f"quay.io={auth_registry.url}"]
    hosts = node.certs_dir / "quay.io" / "hosts.toml"
    creds = tmp_path / "config.json"

    # Without credentials the mirror refuses containerd (401) and the pull falls back to quay.io: it fails here.
    bare = run(*base)
    assert bare.returncode == 0, bare.stderr
    since = auth_registry.mark()
    refused = node.crictl_pull(QUAY_IMAGE, timeout=60)
    assert refused.returncode != 0
    assert auth_registry.requests_for("/v2/k8scsi/csi-resizer/manifests/v0.5.0", since=since, status=401,
                                      agent="containerd") >= 1

    # A credentials file others may read is refused, naming the fix; nothing changes.
    write_auths(creds, auth_registry.host, "first-Secret-pw").chmod(0o644)
    before = hosts.read_bytes()
    open_file = run(*base, "--credentials", str(creds))
    assert open_file.returncode == 2 and "chmod 600" in open_file.stderr, open_file.stderr
    assert hosts.read_bytes() == before

    # With them: a hosts.toml change only (no restart), mode 0600, and the pull comes through the mirror.
    write_auths(creds, auth_registry.host, "first-Secret-pw")
    dry = run(*base, "--credentials", str(creds), "--dry-run")
    assert dry.returncode == 0 and "Authorization" in dry.stdout and "<redacted: credentials file" in dry.stdout
    pid = node.pid
    applied = run(*base, "--credentials", str(creds))
    assert applied.returncode == 0, applied.stderr
    assert node.pid == pid, "a hosts.toml change needs no restart"
    assert stat.S_IMODE(hosts.stat().st_mode) == 0o600
    assert "Authorization = [\"Basic " in hosts.read_text()
    since = auth_registry.mark()
    t0 = time.monotonic()
    pulled = node.crictl_pull(QUAY_IMAGE, timeout=60)
    figures["pull_seconds"] = round(time.monotonic() - t0, 2)
    assert pulled.returncode == 0, pulled.stderr + node.log_tail()
    assert auth_registry.requests_for("/v2/k8scsi/csi-resizer/manifests/v0.5.0?ns=quay.io", since=since,
                                      status=200, agent="containerd") >= 1
    shown = run("show", "--root", str(node.node_root), "-o", "json")
    assert shown.returncode == 0, shown.stderr
    everything_printed = "".join(r.stdout + r.stderr for r in (bare, open_file, dry, applied, shown))
    for secret in secrets_of("first-Secret-pw"):
        assert secret not in everything_printed
    assert leaks(node.node_root, secrets_of("first-Secret-pw"), allowed=hosts) == []

    # Rotation: the registry takes a new password; the old file stops working, the new one is a hosts.toml
    # change only, and the same containerd pulls again.
    assert node.crictl("rmi", QUAY_IMAGE).returncode == 0
    auth_registry.set_users({USER: "second-Secret-pw"})
    assert node.crictl_pull(QUAY_IMAGE, timeout=60).returncode != 0, "the old login no longer works"
    write_auths(creds, auth_registry.host, "second-Secret-pw")
    t0 = time.monotonic()
    rotated = run(*base, "--credentials", str(creds))
    figures["rotation_apply_seconds"] = round(time.monotonic() - t0, 2)
    assert rotated.returncode == 0, rotated.stderr
    assert "restart" not in rotated.stdout
    assert node.pid == pid
    figures["containerd_pid_unchanged"] = node.pid == pid
    pulled = node.crictl_pull(QUAY_IMAGE, timeout=60)
    assert pulled.returncode == 0, pulled.stderr
    assert stat.S_IMODE(hosts.stat().st_mode) == 0o600
    assert leaks(node.node_root, secrets_of("second-Secret-pw") + secrets_of("first-Secret-pw"), allowed=hosts) == []

    # Reset gives the node back its own configuration; no file of regmirror's is left with the login.
    reset = run("reset", "--root", str(node.node_root), "--restart", "command:" + node.ctl_command())
    assert reset.returncode == 0, reset.stderr
    assert not hosts.exists()
    assert leaks(node.node_root, secrets_of("second-Secret-pw"), allowed=hosts) == []
    auth_registry.set_users({USER: "first-Secret-pw"})  # the other flavour starts from the same registry
    assert os.path.exists(auth_registry.htpasswd_path)
