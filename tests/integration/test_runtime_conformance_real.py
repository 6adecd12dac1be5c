"""The runtime contract on every real runtime this machine has: one test, run once per runtime.

containerd 1.6 (Debian's) and 2.x (built from its Go module), dockerd (Debian's docker.io), and CRI-O's files read
by podman (Debian has no CRI-O; podman pulls with the same containers/image library). On each, through the
driver ``drivers.for_node`` picks for the node's own files: apply a Docker Hub mirror, activate (restart or
reload) and find the runtime healthy, pull the image by its original name through the loopback mirror (the
registry's log shows that runtime asking), plan the same again and change nothing, reset and get the node's
files back byte for byte, and pull no more through the mirror. No network reaches Docker Hub here.

The runtime-specific proofs (schemas, inline mode, Docker's removal bridge, CRI-O's refusals) stay in
test_node_engine_real.py, test_containerd2_real.py, test_docker_real.py and test_crio_real.py; the pure contract
is tests/unit/test_runtime_conformance.py.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from regmirror_agent import drivers, engine
from regmirror_agent.nodefiles import NodeRoot
from regmirror_agent.restarting import Host
from regmirror_api import models
from tests.harness.docker import DockerdNode
from tests.harness.fixtures import ContainerdNodeFactory, require_crictl
from tests.harness.podman import Podman
from tests.harness.product import contents
from tests.harness.proofs import HUB_IMAGE
from tests.harness.registry import Registry

pytestmark = pytest.mark.integration

MANIFESTS = "/v2/library/busybox/manifests/"


@dataclasses.dataclass
class RealNode:
    """One real runtime on a node root, as the contract needs it."""

    runtime: str
    """The driver the node's own files must select."""
    settings: engine.Settings
    etc: Path
    """The node's configuration folder, compared byte for byte."""
    pull: Callable[[str], subprocess.CompletedProcess[str]]
    forget: Callable[[str], object]
    """Remove a pulled image, so that the next pull has to reach a registry again."""
    agent: str
    """How this runtime names itself to the registry (the start of its User-Agent)."""


def _containerd(factory: ContainerdNodeFactory, monkeypatch: pytest.MonkeyPatch, flavor: str | None) -> RealNode:
    require_crictl()
    node = factory(3 if flavor else 2, flavor=flavor, start=True, config_path="" if flavor else None)
    if flavor:
        assert re.search(r"Server:\s+Version:\s+v?2\.", node.ctr("version", timeout=10).stdout), "not a 2.x node"
        monkeypatch.setenv("PATH", node.env()["PATH"])  # the driver's `containerd config dump` and `ctr` are 2.x's
    ok, detail = node.wait_cri()
    assert ok, detail
    return RealNode("containerd", engine.Settings(root=str(node.node_root), restart="command:" + node.ctl_command(),
                                                  health_timeout=20, host=Host()),
                    node.etc_dir, node.crictl_pull, lambda image: node.crictl("rmi", image),
                    "containerd/v2" if flavor else "containerd")


def _docker(factory: Callable[..., DockerdNode]) -> RealNode:
    node = factory()
    node.write_daemon_json('{\n\t"log-level":  "info",\n\t"max-concurrent-downloads": 2\n}')
    node.start()
    return RealNode("docker", engine.Settings(root=str(node.node_root), restart="command:" + node.reload_command(),
                                              docker_host=node.host_uri, health_timeout=20, host=Host()),
                    node.etc_dir, node.pull, node.remove_image, "docker/")


def _crio(root: Path, podman_for: Callable[[Path], Podman], reloads: Path) -> RealNode:
    podman = podman_for(root)
    return RealNode("crio", engine.Settings(root=str(root), restart=f"command:echo reload >> {reloads}",
                                            host=Host()),
                    root / "etc", podman.pull, podman.remove_image, "containers/")


@pytest.fixture(params=["containerd-1.6", "containerd-2.x", "docker", "crio"])
def real_node(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RealNode:
    """Each real runtime from the harness' own fixtures (which fail the test, naming what is missing)."""
    if request.param.startswith("containerd"):
        return _containerd(request.getfixturevalue("containerd_node_factory"), monkeypatch,
                           "2.x" if request.param.endswith("2.x") else None)
    if request.param == "docker":
        return _docker(request.getfixturevalue("docker_node_factory"))
    return _crio(request.getfixturevalue("crio_node_root"), request.getfixturevalue("podman_for"),
                 tmp_path / "reloads.log")


def test_a_real_runtime_keeps_the_contract(real_node: RealNode, registry: Registry) -> None:
    node = real_node
    settings = node.settings
    runtime = drivers.named(node.runtime)
    assert engine.runtime_of(settings) == runtime.name, "the node's own files select its runtime"
    own = contents(node.etc)
    since = registry.mark()
    assert node.pull(HUB_IMAGE).returncode != 0, "without a mirror nothing can serve this image (no internet)"
    assert registry.requests_for(MANIFESTS, since=since) == 0

    outcome = engine.apply([models.parse_cli_mirror(f"docker.io={registry.url}")], settings)
    assert outcome.runtime == runtime.name and outcome.changed and outcome.restarted, outcome
    activation = runtime.activate(settings, Host(), NodeRoot(settings.root))  # once more, through the interface
    assert activation.kind == runtime.kind and activation.command
    assert activation.healthy, activation.problem

    since = registry.mark()
    pulled = node.pull(HUB_IMAGE)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert registry.requests_for(MANIFESTS, since=since, agent=node.agent) >= 1, "the pull came through the mirror"

    planned, name = engine.plan([models.parse_cli_mirror(f"docker.io={registry.url}")], settings)
    assert name == runtime.name and not planned.changed, planned.diff()
    assert not runtime.needs_restart(planned)

    reset = engine.reset(settings)
    assert reset.changed
    assert contents(node.etc) == own, "reset gives the node's files back byte for byte"
    assert not (Path(settings.root) / "var/lib/regmirror/state.json").exists()
    assert runtime.activate(settings, Host(), NodeRoot(settings.root)).healthy
    node.forget(HUB_IMAGE)
    since = registry.mark()
    assert node.pull(HUB_IMAGE).returncode != 0, "after reset the mirror is no longer used"
    assert registry.requests_for(MANIFESTS, since=since) == 0
