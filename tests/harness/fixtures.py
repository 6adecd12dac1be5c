"""pytest fixtures for tests against real containerd, docker-registry and crictl.

Load with ``pytest_plugins = ["tests.harness.fixtures"]`` in the top-level
``tests/conftest.py``.

* ``registry`` (session): a plain-HTTP mirror holding ``k8scsi/csi-resizer:v0.5.0``
  and ``library/busybox:1.36`` (what containerd asks a quay.io / docker.io
  mirror for).  Shared, so compare log counts with ``since=registry.mark()``.
* ``tls_registry`` (session): the same images over HTTPS signed by a test CA
  (``tls_registry.ca_pem``).
* ``containerd_node_factory`` (function): makes :class:`ContainerdNode` objects
  and guarantees that every containerd they (or the product, through
  ``containerd_ctl.sh``) started is dead at teardown, even when the test failed.
* ``docker_node_factory`` (function): the same for :class:`DockerdNode` (a private dockerd).
* ``crio_node_root`` and ``podman_for`` (function): a CRI-O node's root, and a podman
  reading its ``/etc/containers`` (CRI-O is not packaged in Debian; podman pulls with its library).

Missing binaries fail the requesting test at once with the reason (never skip: a
test that needs a component is proven on it; ``.ci/run`` installs every one).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from tests.harness.containerd import CONTAINERD_BIN, CTR_BIN, ContainerdNode, find_binary, flavor_dir
from tests.harness.docker import DockerdNode, missing_docker_binaries
from tests.harness.podman import Podman, missing_podman_binaries, write_crio_node
from tests.harness.registry import REGISTRY_BIN, SKOPEO_BIN, Registry

# (repository in the mirror, tag): images every session registry serves.
SEED_IMAGES: tuple[tuple[str, str], ...] = (
    ("k8scsi/csi-resizer", "v0.5.0"),
    ("library/busybox", "1.36"),
)


def require_binaries(*names: str) -> None:
    """Fail the current test, naming what is missing, unless every named executable is available."""
    missing = [n for n in names if find_binary(n) is None]
    if missing:
        pytest.fail(f"real components missing: {', '.join(missing)} (see /work/shared/REAL-COMPONENTS.md)")


def _start_seeded_registry(workdir: Path, *, tls: bool) -> Registry:
    reg = Registry(workdir, tls=tls)
    try:
        for repo, tag in SEED_IMAGES:
            reg.push(repo, tag, f"{repo}:{tag} served by the regmirror test registry ({reg.url})\n")
    except BaseException:
        reg.stop()
        raise
    return reg


def _serve_seeded(tmp_path_factory: pytest.TempPathFactory, name: str, *, tls: bool) -> Iterator[Registry]:
    require_binaries(REGISTRY_BIN, SKOPEO_BIN)
    reg = _start_seeded_registry(tmp_path_factory.mktemp(name), tls=tls)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP docker-registry with the seed images, for the whole session."""
    yield from _serve_seeded(tmp_path_factory, "registry", tls=False)


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An HTTPS docker-registry (certificate from a throwaway CA) with the seed images."""
    yield from _serve_seeded(tmp_path_factory, "tls-registry", tls=True)


class ContainerdNodeFactory(Protocol):
    """Signature of the ``containerd_node_factory`` fixture."""

    def __call__(
        self,
        version: int | None = 2,
        *,
        name: str | None = None,
        config_path: str | None = None,
        mirrors: Mapping[str, Sequence[str]] | None = None,
        extra: str = "",
        start: bool = False,
        flavor: str | None = None,
    ) -> ContainerdNode: ...


@pytest.fixture
def containerd_node_factory(tmp_path: Path) -> Iterator[ContainerdNodeFactory]:
    """Make simulated nodes; stop and clean up all of them at teardown.

    ``factory(version, name=..., config_path=..., mirrors=..., extra=..., start=..., flavor=...)``:
    ``version`` 1 or 2 (3 for a 2.x node) writes a starting config.toml (``None`` writes none, for
    tests that write their own); ``start=True`` starts containerd and waits for
    its socket.  ``flavor="2.x"`` runs containerd 2.x from ``.cache/bin/containerd2``
    (:func:`tests.harness.containerd.containerd2_dir`); a missing binary fails the test, naming it.
    The node root is ``tmp_path/<name>`` (kept by pytest for inspection, with a copy of
    ``containerd.log``); the runtime dir is a short ``/tmp/rmn-*`` dir (socket path limit),
    deleted at teardown.
    """
    require_binaries(CONTAINERD_BIN, CTR_BIN, "unshare")
    nodes: list[ContainerdNode] = []

    def make(
        version: int | None = 2,
        *,
        name: str | None = None,
        config_path: str | None = None,
        mirrors: Mapping[str, Sequence[str]] | None = None,
        extra: str = "",
        start: bool = False,
        flavor: str | None = None,
    ) -> ContainerdNode:
        binaries_dir = None
        if flavor is not None:
            binaries_dir = flavor_dir(flavor)
            missing = [str(binaries_dir / b) for b in ("containerd", "ctr")
                       if not os.access(binaries_dir / b, os.X_OK)]
            if missing:
                pytest.fail(f"containerd {flavor} missing: {', '.join(missing)} "
                            f"(build it: REGMIRROR_BUILD=containerd2 hack/build-control-plane.sh)")
        name = name or f"node{len(nodes)}"
        state_dir = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))
        node = ContainerdNode(tmp_path / name, state_dir, name=name, binaries_dir=binaries_dir)
        nodes.append(node)
        if version is not None:
            node.write_config(version, config_path=config_path, mirrors=mirrors, extra=extra)
        if start:
            node.start()
        return node

    try:
        yield make
    finally:
        errors: list[str] = []
        for node in nodes:
            try:
                node.stop()
            except Exception as e:  # keep cleaning the other nodes
                errors.append(f"{node.name}: {e}")
                node.kill_leftovers()
            if node.log_path.exists():
                shutil.copy(node.log_path, node.node_root / "containerd.log")
            shutil.rmtree(node.state_dir, ignore_errors=True)
        leaked = [n.name for n in nodes if n.running]
        if errors or leaked:
            raise RuntimeError(f"containerd teardown problems: errors={errors} leaked={leaked}")


def crictl_available() -> bool:
    return find_binary("crictl") is not None


def require_crictl() -> Path:
    """Skip unless crictl was built (hack/build-control-plane.sh) or is on PATH."""
    path = find_binary("crictl")
    if path is None:
        pytest.fail("crictl missing: expected in $REGMIRROR_BIN_DIR, .cache/bin or PATH")
    return path


__all__: Sequence[str] = (
    "SEED_IMAGES",
    "ContainerdNodeFactory",
    "containerd_node_factory",
    "crictl_available",
    "registry",
    "require_binaries",
    "require_crictl",
    "tls_registry",
)


@pytest.fixture
def docker_node_factory(tmp_path: Path) -> Iterator[Callable[..., DockerdNode]]:
    """``factory(name="node", extra_flags=())`` makes a DockerdNode under tmp_path (not started); at teardown
    every one is stopped, and teardown fails if a process, a mount or a network interface was left behind."""
    missing = missing_docker_binaries()
    if missing:
        pytest.fail(f"real components missing: {', '.join(missing)} "
                    f"(apt-get install --no-install-recommends docker.io)")
    nodes: list[DockerdNode] = []

    def make(name: str = "node", extra_flags: Sequence[str] = ()) -> DockerdNode:
        node = DockerdNode(tmp_path / name, name=name, extra_flags=extra_flags)
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        errors = []
        for node in nodes:
            try:
                node.stop()
            except RuntimeError as exc:
                errors.append(str(exc))
            if node.log_path.exists():  # kept by pytest for inspection; run_dir (short, in /tmp) is deleted
                (tmp_path / f"{node.name}-dockerd.log").write_text(node.log_text())
            node.close()
        if errors:
            raise RuntimeError("; ".join(errors))


@pytest.fixture
def crio_node_root(tmp_path: Path) -> Path:
    """A CRI-O node's root (``tmp_path/node``), as ``podman.write_crio_node`` makes it."""
    missing = missing_podman_binaries()
    if missing:
        pytest.fail(f"real components missing: {', '.join(missing)} (apt-get install --no-install-recommends podman)")
    return write_crio_node(tmp_path / "node")


@pytest.fixture
def podman_for(tmp_path: Path) -> Iterator[Callable[[Path], Podman]]:
    """``podman_for(root)``: a podman reading that node root's ``/etc/containers``; closed at teardown."""
    made: list[Podman] = []

    def make(root: Path) -> Podman:
        made.append(Podman(root, tmp_path / "podman"))
        return made[-1]

    yield make
    for podman in made:
        podman.close()
