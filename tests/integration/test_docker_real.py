"""`regmirror apply/reset --runtime docker` on a real dockerd (Debian docker.io 20.10), pulling through a real
local registry.

No network reaches Docker Hub here (the lookup of registry-1.docker.io fails): a ``docker pull busybox:1.36``
that succeeds came through the mirror regmirror wrote into daemon.json, and the registry's access log shows
dockerd's own User-Agent asking for it. The product reloads dockerd the way ``systemctl reload docker`` does, by
SIGHUP (``--restart "command:kill -HUP $(cat docker.pid)"``); the test proves dockerd picked the change up
without a restart (same pid) and that ``reset`` gives back daemon.json byte for byte.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.docker import DockerdNode
from tests.harness.product import regmirror
from tests.harness.registry import Registry

pytestmark = pytest.mark.integration

IMAGE = "busybox:1.36"  # docker.io/library/busybox:1.36: nothing but the mirror can serve it here
MANIFEST_PATH = "/v2/library/busybox/manifests/1.36"
DOCKERD_AGENT = "docker/20.10"  # the User-Agent of dockerd's pulls ("docker/20.10.24+dfsg1 go/... UpstreamClient(...)")

# The node's own daemon.json: hand-written (odd spacing, key order, no final newline, a non-ASCII label) so a
# byte-identical reset can only come from what regmirror kept, never from re-rendering the JSON.
NODE_DAEMON_JSON = (
    '{\n'
    '\t"log-level":  "info",\n'
    '\t"labels": ["regmirror.test/node=docker-node", "owner=équipe-node"],\n'
    '\t"max-concurrent-downloads": 2,\n'
    '\t"log-driver": "json-file",\n'
    '\t"log-opts": {"max-size": "10m", "max-file": "3"},\n'
    '\t"default-ulimits": {"nofile": {"Name": "nofile", "Hard": 65536, "Soft": 65536}}\n'
    '}'
)


def common_args(node: DockerdNode) -> list[str]:
    return ["--runtime", "docker", "--root", str(node.node_root), "--restart", "command:" + node.reload_command(),
            "--docker-host", node.host_uri]


def stat_of(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


def wait_reloads(node: DockerdNode, count: int, timeout: float = 10.0) -> int:
    """dockerd handles SIGHUP asynchronously: wait until its log shows ``count`` reloads."""
    deadline = time.monotonic() + timeout
    while node.reload_count() < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return node.reload_count()


def loaded_config(node: DockerdNode) -> dict[str, object]:
    """The configuration dockerd logged after its last reload ("Reloaded configuration: {...}")."""
    line = [ln for ln in node.log_text().splitlines() if "Reloaded configuration:" in ln][-1]
    payload = line.split('msg="Reloaded configuration: ', 1)[1].rsplit('"', 1)[0]
    doc: dict[str, object] = json.loads(payload.replace('\\"', '"'))  # logrus quotes the JSON's own quotes
    return doc


class Timings(dict[str, float]):
    """Step durations, printed as they are taken (``pytest -s`` shows them even when a later step fails)."""

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        print(f"timing: {key} {value:.2f}s", flush=True)


@pytest.fixture
def docker_node(docker_node_factory: Callable[..., DockerdNode]) -> DockerdNode:
    return docker_node_factory()


def test_docker_mirror_reloaded_pulled_through_and_reset(docker_node: DockerdNode, registry: Registry) -> None:
    node = docker_node
    node.write_daemon_json(NODE_DAEMON_JSON)
    original = NODE_DAEMON_JSON.encode()
    t0 = time.monotonic()
    node.start()
    timings = Timings()
    timings["dockerd start"] = time.monotonic() - t0
    pid, pids = node.pid, sorted(node.node_pids())
    assert pid is not None and len(pids) == 2, f"dockerd and its managed containerd: {node._describe(pids)}"
    info = node.info()
    assert info["RegistryConfig"]["Mirrors"] == []
    assert "127.0.0.0/8" in info["RegistryConfig"]["InsecureRegistryCIDRs"], "an http mirror on 127.0.0.1 needs it"
    assert "regmirror.test/node=docker-node" in info["Labels"]
    assert info["DockerRootDir"] == str(node.data_root)

    since = registry.mark()
    before = node.pull(IMAGE)
    assert before.returncode != 0, "without a mirror nothing can serve busybox:1.36 (no internet)"
    assert registry.requests_for("/v2/library/busybox/", since=since) == 0

    # Docker mirrors only Docker Hub: any other registry is refused by name, nothing is written or reloaded.
    untouched = stat_of(node.daemon_json)
    for mirrors in (["quay.io"], ["docker.io", "quay.io"]):
        refused = regmirror("apply", *common_args(node),
                            *[a for r in mirrors for a in ("--mirror", f"{r}={registry.url}")])
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "quay.io" in refused.stderr, refused.stderr
        assert stat_of(node.daemon_json) == untouched
        assert sorted(p.name for p in node.etc_dir.iterdir()) == ["daemon.json"]
        assert not (node.node_root / "var/lib/regmirror/state.json").exists()
    assert node.reload_count() == 0 and node.pid == pid

    # apply: daemon.json gains registry-mirrors, keeps every other key, and dockerd reloads it on SIGHUP.
    t0 = time.monotonic()
    applied = regmirror("apply", *common_args(node), "--mirror", f"docker.io={registry.url}")
    timings["apply"] = time.monotonic() - t0
    assert applied.returncode == 0, applied.stdout + applied.stderr
    doc = json.loads(node.daemon_json.read_text())
    own = json.loads(NODE_DAEMON_JSON)
    assert doc == {**own, "registry-mirrors": [registry.url]}
    assert list(doc)[:len(own)] == list(own), "the node's keys keep their order"
    t0 = time.monotonic()
    assert wait_reloads(node, 1) == 1, node.log_tail()
    mirrors = node.wait_mirrors([registry.url + "/"])
    timings["reload seen in docker info"] = time.monotonic() - t0
    assert mirrors == [registry.url + "/"], node.log_tail()
    assert node.pid == pid and sorted(node.node_pids()) == pids, "reloaded, not restarted"
    text = node.info_text()
    assert f"Registry Mirrors:\n  {registry.url}/\n" in text, text
    assert "regmirror.test/node=docker-node" in text and "owner=équipe-node" in text, "labels still loaded"
    assert loaded_config(node)["registry-mirrors"] == [registry.url]

    since = registry.mark()
    t0 = time.monotonic()
    pulled = node.pull(IMAGE)
    timings["pull through the mirror"] = time.monotonic() - t0
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr + node.log_tail()
    assert registry.requests_for(MANIFEST_PATH, since=since, agent=DOCKERD_AGENT, status=200) >= 1
    image = node.image_inspect(IMAGE)
    assert image is not None
    assert f"busybox@{registry.pushed['library/busybox:1.36'].manifest_digest}" in image["RepoDigests"]

    # The same request again changes nothing: same bytes, same file, no reload.
    unchanged = stat_of(node.daemon_json)
    again = regmirror("apply", *common_args(node), "--mirror", f"docker.io={registry.url}")
    assert again.returncode == 0, again.stderr
    assert "unchanged" in again.stdout
    assert stat_of(node.daemon_json) == unchanged
    time.sleep(0.3)
    assert node.reload_count() == 1

    # reset: the node's own bytes come back; after its SIGHUP dockerd lists no mirror, still the same process.
    t0 = time.monotonic()
    reset = regmirror("reset", *common_args(node))
    timings["reset"] = time.monotonic() - t0
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert node.daemon_json.read_bytes() == original
    assert wait_reloads(node, 2) == 2, node.log_tail()
    assert node.pid == pid and sorted(node.node_pids()) == pids
    assert node.wait_mirrors([], timeout=5) == [], (
        "reset gave back a daemon.json without registry-mirrors, but dockerd reloads that key only when it is "
        "present (moby daemon/reload.go: if conf.IsValueSet(\"registry-mirrors\")), so after SIGHUP the running "
        "dockerd still mirrors Docker Hub through " + registry.url + " until it is restarted")
    text = node.info_text()
    assert "Registry Mirrors" not in text and registry.url not in text, text
    assert "regmirror.test/node=docker-node" in text

    # And Docker Hub names no longer reach the mirror.
    node.remove_image(IMAGE)
    since = registry.mark()
    assert node.pull(IMAGE).returncode != 0
    assert registry.requests_for("/v2/library/busybox/", since=since) == 0

    t0 = time.monotonic()
    node.stop()
    timings["dockerd stop"] = time.monotonic() - t0


def test_docker_node_own_mirrors_and_hand_edits_survive(docker_node: DockerdNode, registry: Registry) -> None:
    """The node already mirrors Docker Hub elsewhere: regmirror's mirror replaces it, reset brings it back, and
    a hand edit made in between survives the reset."""
    node = docker_node
    own = {"registry-mirrors": ["https://mirror.gcr.io"], "log-level": "info", "debug": False}
    node.write_daemon_json(json.dumps(own, indent=4))
    node.start()
    pid = node.pid
    assert node.mirrors() == ["https://mirror.gcr.io/"]

    applied = regmirror("apply", *common_args(node), "--mirror", f"docker.io={registry.url}")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert json.loads(node.daemon_json.read_text()) == {**own, "registry-mirrors": [registry.url]}
    assert wait_reloads(node, 1) == 1
    assert node.wait_mirrors([registry.url + "/"]) == [registry.url + "/"]
    since = registry.mark()
    pulled = node.pull(IMAGE)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr + node.log_tail()
    assert registry.requests_for(MANIFEST_PATH, since=since, agent=DOCKERD_AGENT) >= 1

    # Someone turns debug on by hand (and reloads); reset must keep that and give back only the mirrors.
    edited = json.loads(node.daemon_json.read_text())
    edited["debug"] = True
    node.daemon_json.write_text(json.dumps(edited, indent=2) + "\n")
    node.reload()
    assert wait_reloads(node, 2) == 2
    deadline = time.monotonic() + 10
    while not node.info()["Debug"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.info()["Debug"] is True

    reset = regmirror("reset", *common_args(node))
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert json.loads(node.daemon_json.read_text()) == {**own, "debug": True}
    assert wait_reloads(node, 3) == 3
    assert node.wait_mirrors(["https://mirror.gcr.io/"]) == ["https://mirror.gcr.io/"]
    info = node.info()
    assert info["Debug"] is True
    assert node.pid == pid


def test_docker_node_with_a_registry_mirror_flag(docker_node_factory: Callable[..., DockerdNode],
                                                 registry: Registry) -> None:
    """A node whose dockerd already has ``--registry-mirror`` on its command line (a systemd drop-in, or
    DOCKER_OPTS in /etc/default/docker) cannot also have ``registry-mirrors`` in daemon.json: dockerd refuses
    such a file, on reload and at its next start. regmirror must not report success and leave that file behind
    (README: exit 1 means every file is exactly as it was)."""
    node = docker_node_factory(extra_flags=["--registry-mirror", "https://mirror.gcr.io"])
    original = json.dumps({"log-level": "info"}) + "\n"
    node.write_daemon_json(original)
    node.start()
    assert node.mirrors() == ["https://mirror.gcr.io/"]

    applied = regmirror("apply", *common_args(node), "--mirror", f"docker.io={registry.url}")
    wait_reloads(node, 1, timeout=3)  # a product that refuses up front sends no SIGHUP at all
    time.sleep(0.3)
    conflict = "specified both as a flag and in the configuration file: registry-mirrors"
    dockerd_refused = conflict in node.log_text()
    assert node.mirrors() == ["https://mirror.gcr.io/"]
    # Whatever regmirror says, the node must still be able to restart its dockerd afterwards.
    node.stop()
    try:
        node.start(timeout=15)
        restart_error = ""
    except RuntimeError as exc:
        restart_error = str(exc).splitlines()[-1]
    assert applied.returncode == 1 and node.daemon_json.read_text() == original and not restart_error, (
        f"regmirror apply exited {applied.returncode} ({applied.stdout.strip()!r}); dockerd refused the reload: "
        f"{dockerd_refused}; daemon.json is now {node.daemon_json.read_text()!r}; dockerd restart: "
        f"{restart_error or 'ok'}")
