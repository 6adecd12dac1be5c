"""``verifying.verify`` on real containerd 1.6 (Debian) and 2.x nodes, with the real registry as the mirror.

Each verdict is checked against the truth: a ``crictl pull`` of the original name, which only the mirror can serve
here (no network reaches quay.io), and the mirror's access log. The timings of ``verify`` are printed (``-s``).
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from regmirror_agent import effective, engine, verifying
from regmirror_agent.restarting import Host
from regmirror_api import models
from tests.harness.containerd import ContainerdNode
from tests.harness.fixtures import ContainerdNodeFactory, require_crictl
from tests.harness.proofs import QUAY_IMAGE
from tests.harness.registry import Registry

pytestmark = pytest.mark.integration

IMAGES_PLUGIN = "io.containerd.cri.v1.images"
TWO_DIRS = "/etc/containerd/certs.d:/etc/docker/certs.d"


def started(factory: ContainerdNodeFactory, flavor: str, monkeypatch: pytest.MonkeyPatch,
            **kw: object) -> ContainerdNode:
    """A started node: 1.6 with a version-2 config.toml, or 2.x with version 3 (and 2.x first on PATH, for the
    engine's own ``ctr``/``containerd`` calls in this process)."""
    if flavor == "2.x":
        node = factory(3, flavor="2.x", start=True, **kw)  # type: ignore[arg-type]
        monkeypatch.setenv("PATH", node.env()["PATH"])
        assert re.search(r"Server:\s+Version:\s+v?2\.", node.ctr("version", timeout=10).stdout)
    else:
        node = factory(2, start=True, **kw)  # type: ignore[arg-type]
    ok, detail = node.wait_cri()
    assert ok, detail
    return node


def settings(node: ContainerdNode, restart: str | None = None, mode: str = "auto") -> engine.Settings:
    return engine.Settings(root=str(node.node_root), restart=restart or "command:" + node.ctl_command(), mode=mode,
                           health_timeout=20, host=Host())


def quay(registry: Registry, image: str | None = None) -> models.RegistryMirror:
    spec: dict[str, object] = {"registry": "quay.io", "mirrors": [registry.url]}
    if image:
        spec["verify"] = {"image": image}
    return models.parse_spec("quay", spec)


def timed_verify(node: ContainerdNode, mirror: models.RegistryMirror, label: str) -> verifying.Verification:
    start = time.monotonic()
    result = verifying.verify(settings(node), [mirror], Host())[mirror.name]
    print(f"\n[verify] {label}: {time.monotonic() - start:.3f}s wall, {result.seconds:.3f}s reported -> "
          f"{result.in_use} {result.reason}: {result.message}")
    return result


@pytest.mark.parametrize("flavor", ["1.6", "2.x"])
def test_after_hosts_mode_is_applied_the_runtime_uses_the_mirror(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch,
        flavor: str) -> None:
    require_crictl()
    node = started(containerd_node_factory, flavor, monkeypatch, config_path="")
    mirror = quay(registry)
    before = timed_verify(node, mirror, f"{flavor} before apply")
    assert before.in_use is False
    if flavor == "2.x":
        assert before.reason == effective.CONFIG_PATH_LIST and "built-in config_path" in before.message
    else:
        assert before.reason == effective.NO_CONFIG_PATH

    engine.apply([mirror], settings(node))
    result = timed_verify(node, mirror, f"{flavor} after apply")
    assert result.in_use is True, result.message
    assert result.reason == effective.IN_USE
    assert result.seconds < 1.0
    since = registry.mark()
    pulled = node.crictl_pull(QUAY_IMAGE)
    assert pulled.returncode == 0, pulled.stderr
    assert registry.requests_for("/v2/k8scsi/csi-resizer/manifests/", since=since, agent="containerd") >= 1


def test_containerd_2_x_with_a_config_path_list_set_by_hand_is_reported_as_not_using_the_mirror(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """After regmirror applied hosts mode, someone sets the EKS-style list by hand and restarts containerd 2.x:
    certs.d/quay.io/hosts.toml is still there, and CRI pulls ignore it (#12415)."""
    require_crictl()
    node = started(containerd_node_factory, "2.x", monkeypatch, config_path="")
    mirror = quay(registry)
    engine.apply([mirror], settings(node))
    assert timed_verify(node, mirror, "2.x applied").in_use is True

    text = node.config_path.read_text()
    assert "config_path = '/etc/containerd/certs.d'" in text or 'config_path = "/etc/containerd/certs.d"' in text
    node.config_path.write_text(re.sub(r"config_path = ['\"]/etc/containerd/certs.d['\"]",
                                       f"config_path = '{TWO_DIRS}'", text))
    node.restart()
    ok, detail = node.wait_cri()
    assert ok, detail

    result = timed_verify(node, mirror, "2.x config_path list by hand")
    assert result.in_use is False and result.reason == effective.CONFIG_PATH_LIST
    assert f"containerd v2.3.7 ignores config_path = '{TWO_DIRS}' for CRI pulls" in result.message
    since = registry.mark()  # the truth: a CRI pull does not reach the mirror
    assert node.crictl_pull(QUAY_IMAGE).returncode != 0
    assert registry.requests_for("/v2/k8scsi/csi-resizer/", since=since) == 0


@pytest.mark.parametrize("flavor", ["1.6", "2.x"])
def test_a_verify_image_served_by_the_mirror_is_in_use_and_the_mirror_saw_the_head(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch,
        flavor: str) -> None:
    node = started(containerd_node_factory, flavor, monkeypatch, config_path="")
    mirror = quay(registry, QUAY_IMAGE)
    engine.apply([mirror], settings(node))
    since = registry.mark()
    result = timed_verify(node, mirror, f"{flavor} verify image")
    assert result.in_use is True, result.message
    assert result.answered_by == registry.url
    assert result.message == f"{QUAY_IMAGE} resolves through the mirror {registry.url} (HTTP 200)"
    assert registry.requests_for("/v2/k8scsi/csi-resizer/manifests/v0.5.0?ns=quay.io", since=since, method="HEAD",
                                 status=200, agent="regmirror-verify") == 1

    missing = quay(registry, "quay.io/regmirror-test/absent:1")
    since = registry.mark()
    absent = timed_verify(node, missing, f"{flavor} verify image the mirror lacks")
    assert absent.in_use is False and absent.reason == effective.NOT_SERVED
    assert f"the mirror {registry.url} answered HTTP 404" in absent.message
    assert registry.requests_for("/v2/regmirror-test/absent/manifests/1", since=since, status=404) == 1


@pytest.mark.parametrize("flavor", ["1.6", "2.x"])
def test_inline_mode_change_written_but_not_restarted_is_not_in_use(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch,
        flavor: str) -> None:
    """Inline mirrors applied with a restart are in force; a second change written with ``--restart never``
    leaves the old ones running: the verdict says restart containerd."""
    node = started(containerd_node_factory, flavor, monkeypatch)
    first = quay(registry)
    engine.apply([first], settings(node, mode="inline"))
    assert timed_verify(node, first, f"{flavor} inline applied").in_use is True

    time.sleep(1.6)  # the process start time is known to about a second (verifying.CLOCK_SLACK)
    second = models.parse_spec("quay", {"registry": "quay.io", "mirrors": [registry.url, "http://127.0.0.1:9"]})
    pid = node.pid
    outcome = engine.apply([second], settings(node, restart="never", mode="inline"))
    assert not outcome.restarted and node.pid == pid
    result = timed_verify(node, second, f"{flavor} inline written, not restarted")
    assert result.in_use is False and result.reason == effective.NOT_RESTARTED, result.message
    assert "restart containerd" in result.message
    if flavor == "1.6":
        assert f"registry.mirrors ['{registry.url}'] for quay.io from before" in result.message
    else:
        assert "config.toml changed at" in result.message and f"process {pid}" in result.message


def test_no_containerd_answering_cannot_tell(containerd_node_factory: ContainerdNodeFactory,
                                            registry: Registry) -> None:
    node = containerd_node_factory(2)
    result = verifying.verify(settings(node), [quay(registry)], Host())["quay"]
    assert result.in_use is None and result.reason == effective.CANNOT_TELL
    assert f"cannot reach containerd on {node.socket}" in result.message


@pytest.mark.parametrize("flavor", ["1.6", "2.x"])
def test_crictl_info_is_the_fallback_and_reads_the_same(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch,
        flavor: str) -> None:
    """When the socket cannot be spoken to directly, the node's crictl answers the same Status: on 2.x without
    any ``registry`` in its ``config``, exactly as the direct call."""
    crictl = require_crictl()
    node = started(containerd_node_factory, flavor, monkeypatch, config_path="")
    mirror = quay(registry)
    engine.apply([mirror], settings(node))
    direct = verifying.ask_runtime(Host(), str(node.socket))
    monkeypatch.setenv("PATH", f"{crictl.parent}:{node.env()['PATH']}")

    def refuse(*_: object, **__: object) -> None:
        raise verifying.crigrpc.CriError("refused for the test")

    monkeypatch.setattr(verifying.crigrpc, "ask", refuse)
    fallback = verifying.ask_runtime(Host(), str(node.socket))
    assert fallback.api == "crictl info" and fallback.version == direct.version
    assert ("registry" in fallback.info["config"]) == (flavor == "1.6") == ("registry" in direct.info["config"])
    result = timed_verify(node, mirror, f"{flavor} through crictl")
    assert result.in_use is True and result.reason == effective.IN_USE, result.message


@pytest.mark.parametrize("flavor", ["1.6", "2.x"])
def test_hosts_mode_written_but_containerd_never_restarted_is_not_in_use(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch,
        flavor: str) -> None:
    """The first move into hosts mode sets config_path, which needs a restart; without it (a restart that did
    nothing looks the same) the files are all there and containerd runs as before."""
    require_crictl()
    node = started(containerd_node_factory, flavor, monkeypatch, config_path="")
    time.sleep(1.6)  # the process start time is known to about a second (verifying.CLOCK_SLACK)
    mirror = quay(registry)
    pid = node.pid
    engine.apply([mirror], settings(node, restart="never"))
    assert node.pid == pid and (node.certs_dir / "quay.io" / "hosts.toml").exists()
    result = timed_verify(node, mirror, f"{flavor} hosts mode written, not restarted")
    assert result.in_use is False and result.reason == effective.NOT_RESTARTED, result.message
    if flavor == "1.6":
        assert result.message.startswith("containerd still runs with config_path = '', while config.toml now says "
                                         "'/etc/containerd/certs.d'")
    else:
        assert "config.toml changed at" in result.message
    since = registry.mark()  # the truth: a CRI pull does not reach the mirror
    assert node.crictl_pull(QUAY_IMAGE).returncode != 0
    assert registry.requests_for("/v2/k8scsi/csi-resizer/", since=since) == 0


def test_a_mirror_that_never_answers_costs_one_timeout_then_the_next_host_is_asked(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror that accepts connections and never answers, placed first: the verify image's HEAD to it times
    out (containerd falls through the same way), and the next mirror serves it."""
    node = started(containerd_node_factory, "1.6", monkeypatch, config_path="")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        mirror = models.parse_spec("quay", {"registry": "quay.io", "mirrors": [hung, registry.url],
                                            "verify": {"image": QUAY_IMAGE}})
        engine.apply([mirror], settings(node))
        result = timed_verify(node, mirror, "1.6 first mirror hangs")
    assert result.in_use is True and result.answered_by == registry.url
    assert result.message.startswith(f"{QUAY_IMAGE} resolves through the mirror {registry.url} (HTTP 200) after "
                                     f"the mirror {hung} failed (TimeoutError")
    assert verifying.TIMEOUT <= result.seconds < verifying.TIMEOUT + 1


def test_a_docker_hub_verify_image_is_asked_for_under_library_with_its_namespace(
        containerd_node_factory: ContainerdNodeFactory, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    node = started(containerd_node_factory, "2.x", monkeypatch, config_path="")
    hub = models.parse_spec("hub", {"registry": "docker.io", "mirrors": [registry.url],
                                    "verify": {"image": "docker.io/busybox:1.36"}})
    engine.apply([hub], settings(node))
    since = registry.mark()
    result = timed_verify(node, hub, "2.x docker.io verify image")
    assert result.in_use is True, result.message
    assert registry.requests_for("/v2/library/busybox/manifests/1.36?ns=docker.io", since=since, method="HEAD",
                                 status=200, agent="regmirror-verify") == 1


def test_a_failed_cri_plugin_cannot_tell_and_says_why(containerd_node_factory: ContainerdNodeFactory,
                                                      registry: Registry) -> None:
    """Inline mirrors beside config_path: containerd 1.6 runs, its CRI plugin does not load."""
    node = containerd_node_factory(2, config_path="/etc/containerd/certs.d", mirrors={"quay.io": [registry.url]},
                                   start=True)
    result = verifying.verify(settings(node), [quay(registry)], Host())["quay"]
    print(f"\n[verify] 1.6 CRI plugin failed: {result.seconds:.3f}s -> {result.in_use} {result.reason}: "
          f"{result.message}")
    assert result.in_use is None and result.reason == effective.CANNOT_TELL
    assert "serves no CRI runtime service" in result.message and "kubelet cannot use it" in result.message
