"""Self-tests: the harness must prove what it claims, or product tests built on it prove nothing.

Each test pairs a success with evidence from the registry's access log (the
request really reached the mirror, asked by containerd) and, where cheap, a
negative control (the same pull without the mirror fails: there is no
internet, so only the mirror can serve it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.harness.containerd import ContainerdNode, render_config
from tests.harness.fixtures import ContainerdNodeFactory, require_crictl
from tests.harness.oci import build_oci_image
from tests.harness.registry import Registry

RESIZER = "quay.io/k8scsi/csi-resizer:v0.5.0"
BUSYBOX = "docker.io/library/busybox:1.36"
RESIZER_MANIFEST = "/v2/k8scsi/csi-resizer/manifests/v0.5.0?ns=quay.io"
BUSYBOX_MANIFEST = "/v2/library/busybox/manifests/1.36?ns=docker.io"
CERTS_D = "/etc/containerd/certs.d"


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    """Assertion message with everything needed to debug a failed client call."""
    return f"rc={res.returncode}\nstdout={res.stdout[-2000:]}\nstderr={res.stderr[-2000:]}"


def _assert_cri_ok(node: ContainerdNode) -> None:
    ok, detail = node.wait_cri()
    assert ok, f"CRI plugin of {node.name} not ok: {detail}\n{node.log_tail()}"


# ---------------------------------------------------------------------------
# OCI layout (pure Python, no components needed)
# ---------------------------------------------------------------------------


def test_oci_layout_is_consistent(tmp_path: Path) -> None:
    img = build_oci_image(tmp_path / "layout", "v1", "hello from v1\n")
    build_oci_image(tmp_path / "layout", "v2", "hello from v2\n")
    blobs = tmp_path / "layout" / "blobs" / "sha256"

    def blob(digest: str) -> bytes:
        data = (blobs / digest.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        return data

    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert tags == ["v1", "v2"]
    assert json.loads((tmp_path / "layout" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}

    manifest = json.loads(blob(img.manifest_digest))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config = json.loads(blob(manifest["config"]["digest"]))
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    layer = blob(manifest["layers"][0]["digest"])
    assert len(layer) == manifest["layers"][0]["size"]
    raw = gzip.decompress(layer)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        f = tar.extractfile("hello.txt")
        assert f is not None and f.read() == b"hello from v1\n"


def test_render_config_schemas(tmp_path: Path) -> None:
    import tomllib

    v1 = tomllib.loads(render_config(1, tmp_path, mirrors={"quay.io": ["http://x"]}))
    assert "version" not in v1
    assert v1["plugins"]["cri"]["containerd"]["snapshotter"] == "native"
    assert v1["plugins"]["cri"]["registry"]["mirrors"]["quay.io"]["endpoint"] == ["http://x"]
    v2 = tomllib.loads(render_config(2, tmp_path, config_path=CERTS_D))
    assert v2["version"] == 2
    cri = v2["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["registry"]["config_path"] == CERTS_D
    assert v2["grpc"]["address"] == str(tmp_path / "containerd.sock")


# ---------------------------------------------------------------------------
# Real components
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_ctr_pull_through_hosts_toml(registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """(1) hosts.toml alone (no CRI settings): ``ctr --hosts-dir`` pulls through the mirror."""
    node = containerd_node_factory(2, start=True)
    node.write_hosts_toml("quay.io", registry.url)
    mark = registry.mark()

    res = node.ctr_pull(RESIZER)

    assert res.returncode == 0, _ok(res)
    assert registry.requests_for(RESIZER_MANIFEST, since=mark, agent="containerd") >= 1
    assert node.images(namespace="default")[RESIZER] == registry.pushed["k8scsi/csi-resizer:v0.5.0"].manifest_digest


@pytest.mark.integration
def test_ctr_pull_without_mirror_fails(registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """Negative control: no hosts.toml, no internet, so the pull must fail (quickly)."""
    node = containerd_node_factory(2, start=True)
    mark = registry.mark()
    started = time.monotonic()

    res = node.ctr_pull(RESIZER, timeout=30)

    assert res.returncode != 0, _ok(res)
    assert time.monotonic() - started < 20
    assert registry.requests_for("csi-resizer", since=mark) == 0


@pytest.mark.integration
def test_crictl_pull_through_config_path(registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """(2) v2 ``config_path`` + hosts.toml for quay.io and docker.io: CRI pulls go to the mirror."""
    require_crictl()
    node = containerd_node_factory(2, config_path=CERTS_D)
    node.write_hosts_toml("quay.io", registry.url)
    node.write_hosts_toml("docker.io", registry.url)
    node.start()
    _assert_cri_ok(node)
    mark = registry.mark()

    for image in (RESIZER, BUSYBOX):
        res = node.crictl_pull(image)
        assert res.returncode == 0, _ok(res)

    assert registry.requests_for(RESIZER_MANIFEST, since=mark, agent="containerd") >= 1
    assert registry.requests_for(BUSYBOX_MANIFEST, since=mark, agent="containerd") >= 1
    # Blobs came through the mirror too (fresh node: nothing cached).
    assert registry.requests_for("/v2/library/busybox/blobs/", since=mark, method="GET", status=200) >= 2
    images = node.images()
    assert images[RESIZER] == registry.pushed["k8scsi/csi-resizer:v0.5.0"].manifest_digest
    assert images[BUSYBOX] == registry.pushed["library/busybox:1.36"].manifest_digest


@pytest.mark.integration
def test_crictl_pull_without_mirror_fails(registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """Negative control for (2): config_path set but no hosts.toml, so CRI cannot reach quay.io."""
    require_crictl()
    node = containerd_node_factory(2, config_path=CERTS_D, start=True)
    _assert_cri_ok(node)
    mark = registry.mark()

    res = node.crictl_pull(RESIZER, timeout=30)

    assert res.returncode != 0, _ok(res)
    assert registry.requests_for("csi-resizer", since=mark) == 0


@pytest.mark.integration
def test_crictl_pull_through_v1_inline_mirror(
    registry: Registry, containerd_node_factory: ContainerdNodeFactory
) -> None:
    """(3) v1 schema (no version key) with inline ``plugins.cri.registry.mirrors``."""
    require_crictl()
    node = containerd_node_factory(1, mirrors={"quay.io": [registry.url]}, start=True)
    assert "version" not in node.config_path.read_text()
    _assert_cri_ok(node)
    mark = registry.mark()

    res = node.crictl_pull(RESIZER)

    assert res.returncode == 0, _ok(res)
    assert registry.requests_for(RESIZER_MANIFEST, since=mark, agent="containerd") >= 1
    assert node.images()[RESIZER] == registry.pushed["k8scsi/csi-resizer:v0.5.0"].manifest_digest


@pytest.mark.integration
def test_mirrors_beside_config_path_breaks_cri(
    registry: Registry, containerd_node_factory: ContainerdNodeFactory
) -> None:
    """(4) containerd keeps running, but the CRI plugin fails; wait_cri must say so, with the reason."""
    node = containerd_node_factory(2, config_path=CERTS_D, mirrors={"quay.io": [registry.url]}, start=True)

    ok, detail = node.wait_cri()

    assert not ok
    assert "`mirrors` cannot be set when `config_path` is provided" in detail, detail
    assert node.running, "containerd itself stays up: only the CRI plugin is broken"
    assert node.ctr("version").returncode == 0


@pytest.mark.integration
def test_two_nodes_side_by_side(registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """(5) Two containerds at once, each seeing only its own /etc/containerd/certs.d."""
    require_crictl()
    host_etc = Path("/etc/containerd")
    host_files_before = {p: p.read_bytes() for p in host_etc.rglob("*") if p.is_file()}
    good = containerd_node_factory(2, name="good", config_path=CERTS_D)
    good.write_hosts_toml("quay.io", registry.url)
    # The other node's quay.io mirror is a closed port: if it saw "good"'s files, its pull would work.
    bad = containerd_node_factory(2, name="bad", config_path=CERTS_D)
    bad.write_hosts_toml("quay.io", "http://127.0.0.1:9")
    good.start()
    bad.start()
    _assert_cri_ok(good)
    _assert_cri_ok(bad)
    assert good.pid != bad.pid and good.running and bad.running

    res_good = good.crictl_pull(RESIZER)
    res_bad = bad.crictl_pull(RESIZER, timeout=30)

    assert res_good.returncode == 0, _ok(res_good)
    assert res_bad.returncode != 0, _ok(res_bad)
    # containerd reports the first host's error: proof that "bad" read its own hosts.toml.
    assert "127.0.0.1:9" in res_bad.stderr, _ok(res_bad)
    assert RESIZER in good.images() and RESIZER not in bad.images()
    # The bind mounts live in private namespaces: the host's /etc/containerd is untouched.
    assert {p: p.read_bytes() for p in host_etc.rglob("*") if p.is_file()} == host_files_before


@pytest.mark.integration
def test_restart_command_applies_new_config(registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """The product's ``--restart command:`` path: returns promptly even with captured pipes,
    gives a new containerd process, which reads the edited config.toml."""
    require_crictl()
    node = containerd_node_factory(2, start=True)
    old_pid = node.pid
    node.write_hosts_toml("quay.io", registry.url)
    node.write_config(2, config_path=CERTS_D)  # CRI only reads config_path at start

    started = time.monotonic()
    res = subprocess.run(node.ctl_command("restart"), shell=True, capture_output=True, text=True, timeout=30,
                         check=False)
    elapsed = time.monotonic() - started

    assert res.returncode == 0, _ok(res)
    assert elapsed < 15, f"restart command took {elapsed:.1f}s"
    node.wait_socket()
    assert node.pid != old_pid
    _assert_cri_ok(node)
    pull = node.crictl_pull(RESIZER)
    assert pull.returncode == 0, _ok(pull)
    assert node.log_text().count("=== regmirror harness: start") == 2

    stop = subprocess.run(node.ctl_command("stop"), shell=True, capture_output=True, text=True, timeout=30,
                          check=False)
    assert stop.returncode == 0, _ok(stop)
    assert not node.running


@pytest.mark.integration
def test_tls_mirror_with_private_ca(tls_registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """An HTTPS mirror signed by a test CA, trusted through hosts.toml ``ca``."""
    require_crictl()
    assert tls_registry.url.startswith("https://") and tls_registry.ca_pem
    node = containerd_node_factory(2, config_path=CERTS_D)
    node.write_hosts_toml("quay.io", tls_registry.url, ca_pem=tls_registry.ca_pem)
    node.start()
    _assert_cri_ok(node)
    mark = tls_registry.mark()

    res_ctr = node.ctr_pull(RESIZER)
    res_cri = node.crictl_pull(RESIZER)

    assert res_ctr.returncode == 0, _ok(res_ctr)
    assert res_cri.returncode == 0, _ok(res_cri)
    assert tls_registry.requests_for(RESIZER_MANIFEST, since=mark, agent="containerd") >= 2


@pytest.mark.integration
def test_tls_mirror_untrusted_ca_fails(tls_registry: Registry, containerd_node_factory: ContainerdNodeFactory) -> None:
    """Negative control for TLS: without the CA the handshake fails and nothing is served."""
    node = containerd_node_factory(2, start=True)
    node.write_hosts_toml("quay.io", tls_registry.url)
    mark = tls_registry.mark()

    res = node.ctr_pull(RESIZER, timeout=30)

    assert res.returncode != 0, _ok(res)
    assert tls_registry.requests_for("csi-resizer", since=mark) == 0
