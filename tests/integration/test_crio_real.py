"""`regmirror apply/reset` on a CRI-O node's files, proven by real podman pulls through a real local registry.

CRI-O is not packaged in Debian 12; podman is, and it pulls with the same containers/image library from the
same ``/etc/containers/registries.conf``, ``registries.conf.d`` and ``certs.d`` (``tests/harness/podman.py``).
No network reaches quay.io or Docker Hub here: a pull that succeeds came through the mirror regmirror's drop-in
names, and the registry's access log shows containers/image's own User-Agent asking for it.

What this does not prove is CRI-O's SIGHUP reload itself: podman reads the files on every command. The test
gives regmirror a reload command that counts its calls (``--restart command:...``), which proves regmirror asks
for a reload exactly when a file changed, never for a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.podman import Podman
from tests.harness.product import contents, regmirror, snapshot
from tests.harness.registry import Registry

pytestmark = pytest.mark.integration

IMAGE = "quay.io/k8scsi/csi-resizer:v0.5.0"
MANIFEST_PATH = "/v2/k8scsi/csi-resizer/manifests/v0.5.0"
HUB_IMAGE = "docker.io/library/busybox:1.36"
HUB_MANIFEST_PATH = "/v2/library/busybox/manifests/1.36"
CONTAINERS_IMAGE = "containers/"  # podman's (and CRI-O's) User-Agent: "containers/5.23.1 (github.com/containers/image)"
DROP_IN = "etc/containers/registries.conf.d/50-regmirror.conf"

class Timings(dict[str, float]):
    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        print(f"timing: {key} {value:.2f}s", flush=True)


@pytest.fixture
def node_root(crio_node_root: Path) -> Path:
    return crio_node_root


def common_args(root: Path, reloads: Path) -> list[str]:
    """No ``--runtime``: the node's /etc/crio/crio.conf makes it a CRI-O node."""
    return ["--root", str(root), "--restart", f"command:echo reload >> {reloads}"]


def reload_count(reloads: Path) -> int:
    return len(reloads.read_text().splitlines()) if reloads.exists() else 0


def test_crio_drop_in_pulled_through_by_podman_and_reset(node_root: Path, tmp_path: Path, registry: Registry,
                                                         podman_for: Callable[[Path], Podman]) -> None:
    podman = podman_for(node_root)
    reloads = tmp_path / "reloads.log"
    original = contents(node_root)
    timings = Timings()

    since = registry.mark()
    t0 = time.monotonic()
    before = podman.pull(IMAGE)
    timings["pull without a mirror (fails)"] = time.monotonic() - t0
    assert before.returncode != 0, "without a mirror nothing can serve quay.io here (no internet)"
    assert "quay.io" in before.stderr and "runroot" not in before.stderr, before.stderr
    print(before.stderr.strip().splitlines()[-1])
    assert registry.requests_for("/v2/k8scsi/", since=since) == 0

    # What registries.conf cannot say is refused by name: nothing is written, nothing reloaded.
    untouched = snapshot(node_root)
    spec_file = tmp_path / "refused.yaml"
    spec_file.write_text(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: pull-only}\n"
        f"spec:\n  registry: quay.io\n  mirrors:\n  - url: {registry.url}\n    capabilities: [pull]\n")
    for args in (["--mirror", f"*={registry.url}"], ["--mirror", f"quay.io={registry.url}/path"],
                 ["-f", str(spec_file)]):
        refused = regmirror("apply", *common_args(node_root, reloads), *args)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "nothing was changed" in refused.stderr, refused.stderr
        assert snapshot(node_root) == untouched
    assert reload_count(reloads) == 0

    # --dry-run: the drop-in's diff, nothing written.
    dry = regmirror("apply", *common_args(node_root, reloads), "--mirror", f"quay.io={registry.url}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    print(dry.stdout)
    assert f'+location = "{registry.host}"' in dry.stdout, dry.stdout
    assert "dry run: 1 file(s) would change on crio, then a reload; nothing was written" in dry.stdout, dry.stdout
    assert snapshot(node_root) == untouched and reload_count(reloads) == 0

    # apply: regmirror's own drop-in, the node's files untouched, one reload.
    t0 = time.monotonic()
    applied = regmirror("apply", *common_args(node_root, reloads), "--mirror", f"quay.io={registry.url}")
    timings["apply"] = time.monotonic() - t0
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "done: 1 file(s) changed on crio, reloaded" in applied.stdout, applied.stdout
    assert "registries.conf's own [[registry]] for 'quay.io' is replaced" in applied.stdout, applied.stdout
    assert reload_count(reloads) == 1
    now = contents(node_root)
    assert {k: v for k, v in now.items() if k in original} == original, "the node's own files are never edited"
    assert sorted(set(now) - set(original)) == [DROP_IN, "var/lib/regmirror/applied.json",
                                                "var/lib/regmirror/state.json"]

    since = registry.mark()
    t0 = time.monotonic()
    pulled = podman.pull(IMAGE)
    timings["podman pull through the mirror"] = time.monotonic() - t0
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert registry.requests_for(MANIFEST_PATH, since=since, agent=CONTAINERS_IMAGE, status=200) >= 1
    assert podman.image_digest(IMAGE) == registry.pushed["k8scsi/csi-resizer:v0.5.0"].manifest_digest

    shown = regmirror("show", "--root", str(node_root))
    assert shown.returncode == 0, shown.stderr
    assert "runtime: crio" in shown.stdout and registry.host in shown.stdout, shown.stdout

    # The same request again: nothing written, no reload.
    unchanged = snapshot(node_root)
    again = regmirror("apply", *common_args(node_root, reloads), "--mirror", f"quay.io={registry.url}")
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr
    assert snapshot(node_root) == unchanged and reload_count(reloads) == 1

    # reset: the node's files byte for byte, one more reload, and pulls no longer reach the mirror.
    t0 = time.monotonic()
    reset = regmirror("reset", *common_args(node_root, reloads))
    timings["reset"] = time.monotonic() - t0
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert contents(node_root) == original
    assert sorted(p.relative_to(node_root).as_posix() for p in node_root.rglob("*") if p.is_dir()) == [
        "etc", "etc/containers", "etc/crio"], "the folders regmirror made are gone too"
    assert reload_count(reloads) == 2
    podman.remove_image(IMAGE)
    since = registry.mark()
    t0 = time.monotonic()
    after = podman.pull(IMAGE)
    timings["pull after reset (fails)"] = time.monotonic() - t0
    assert after.returncode != 0, after.stdout
    assert "quay.io" in after.stderr, after.stderr
    assert registry.requests_for("/v2/", since=since) == 0, "after reset no pull goes to the mirror"


def test_crio_tls_mirror_with_ca_bundle_and_upstream_never(node_root: Path, tmp_path: Path, tls_registry: Registry,
                                                           podman_for: Callable[[Path], Podman]) -> None:
    """docker.io through an HTTPS mirror whose CA only regmirror's certs.d file makes trusted, and never Docker Hub."""
    podman = podman_for(node_root)
    reloads = tmp_path / "reloads.log"
    original = contents(node_root)
    assert tls_registry.ca_pem is not None
    ca = "\n".join("      " + line for line in tls_registry.ca_pem.strip().splitlines())
    spec_file = tmp_path / "hub.yaml"
    spec_file.write_text(
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata: {name: hub}\n"
        f"spec:\n  registry: docker.io\n  upstream: Never\n  mirrors:\n  - url: {tls_registry.url}\n"
        f"    caBundle: |\n{ca}\n")

    # Without the caBundle, the mirror's certificate is not trusted: the pull fails on it.
    no_ca = tmp_path / "hub-no-ca.yaml"
    no_ca.write_text(spec_file.read_text().split("    caBundle:")[0])
    applied = regmirror("apply", *common_args(node_root, reloads), "-f", str(no_ca))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    refused = podman.pull(HUB_IMAGE)
    assert refused.returncode != 0 and "certificate" in refused.stderr, refused.stdout + refused.stderr
    assert not (node_root / "etc/containers/certs.d").exists()

    applied = regmirror("apply", *common_args(node_root, reloads), "-f", str(spec_file))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    ca_file = node_root / f"etc/containers/certs.d/{tls_registry.host}/regmirror.crt"
    assert ca_file.read_text().strip() == tls_registry.ca_pem.strip()
    drop_in = (node_root / DROP_IN).read_text()
    assert f'location = "{tls_registry.host}"' in drop_in and "insecure" not in drop_in, drop_in

    since = tls_registry.mark()
    t0 = time.monotonic()
    pulled = podman.pull(HUB_IMAGE)
    print(f"timing: podman pull through the TLS mirror {time.monotonic() - t0:.2f}s", flush=True)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert tls_registry.requests_for(HUB_MANIFEST_PATH, since=since, agent=CONTAINERS_IMAGE, status=200) >= 1

    reset = regmirror("reset", *common_args(node_root, reloads))
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert contents(node_root) == original
    assert not (node_root / "etc/containers/certs.d").exists()
    assert reload_count(reloads) == 2, "the CA file alone needs no reload; the first apply and reset do"
