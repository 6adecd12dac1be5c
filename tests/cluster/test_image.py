"""The shipped image, built from the shipped Dockerfile by a real dockerd, and run (test_install.py then imports it
into every node's containerd, 1.6 and 2.x, and runs the agent and the operator from it).

The image is built once per source tree and machine (tests/cluster/image.py caches the tar under .cache/image);
a later session loads it, so these tests stay fast. Its base is Debian bookworm with Debian's python3, made here
from Debian's packages, since no registry other than PyPI is reachable: the Dockerfile must work on it as on
python:3.11-slim.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import image as images
from tests.harness.docker import DockerdNode, missing_docker_binaries

pytestmark = pytest.mark.integration

TAG = images.DEFAULT_TAG


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerdNode]:
    missing = missing_docker_binaries()
    if missing:
        pytest.fail(f"real components missing: {', '.join(missing)} "
                    "(apt-get install --no-install-recommends docker.io)")
    node = DockerdNode(tmp_path_factory.mktemp("image-dockerd"), name="image-dockerd")
    node.write_daemon_json({})
    node.start()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def image(dockerd: DockerdNode) -> images.BuiltImage:
    built = images.ensure_image(dockerd, tag=TAG)
    print(f"\nimage: {built.describe()}")
    return built


# What one container of the image runs (as its default user, without a network): check name -> command. One
# container for all of them, because each container costs a full copy of the image on dockerd's vfs driver.
PROBES: dict[str, str] = {
    "id": "id",
    "cmd": "regmirror --help",
    "agent": "regmirror agent --help",
    "kopf": "kopf run --help",
    "import": "python3 -c 'import regmirror_operator.main, regmirror_agent.cli, sys; print(sys.prefix)'",
    "nsenter": "nsenter --version",
    "sh": "sh -c 'echo from-sh'",
    "pip": "python3 -m pip --version",
    "build-tools": "command -v gcc cc make; ls /root/.cache /home/*/.cache",
}


@pytest.fixture(scope="module")
def probed(dockerd: DockerdNode, image: images.BuiltImage) -> dict[str, tuple[int, str]]:
    """{check: (exit code, output)} of PROBES, run in one ``docker run --rm --network none IMAGE sh -c``."""
    script = "".join(f"echo '=== {name}'; {cmd} 2>&1; echo \"=== rc $?\"\n" for name, cmd in PROBES.items())
    res = dockerd.docker("run", "--rm", "--network", "none", image.reference, "sh", "-c", script, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    found = {m[1]: (int(m[3]), m[2]) for m in re.finditer(r"^=== (\S+)\n(.*?)^=== rc (\d+)$", res.stdout, re.S | re.M)}
    assert set(found) == set(PROBES), res.stdout
    return found


def test_image_runs_as_uid_10001_by_default(dockerd: DockerdNode, image: images.BuiltImage,
                                            probed: dict[str, tuple[int, str]]) -> None:
    code, out = probed["id"]
    assert code == 0, out
    assert out.split()[0] == "uid=10001(regmirror)" and "gid=10001(regmirror)" in out, out
    config = dockerd.image_inspect(image.reference)
    assert config is not None and config["Config"]["User"] == "10001"
    assert config["Config"]["Cmd"] == ["regmirror", "--help"]
    res = dockerd.docker("run", "--rm", "--network", "none", image.reference, "id", "-u", timeout=120)
    assert (res.returncode, res.stdout.strip()) == (0, "10001"), res.stdout + res.stderr


def test_image_holds_the_agent_and_the_operator(probed: dict[str, tuple[int, str]]) -> None:
    code, out = probed["cmd"]
    assert code == 0 and "agent" in out, out
    code, out = probed["agent"]
    assert code == 0 and "usage" in out.lower(), out
    code, out = probed["kopf"]
    assert code == 0 and "--standalone" in out, out
    code, out = probed["import"]
    assert code == 0 and out.strip() == "/opt/regmirror", out


def test_image_has_what_the_agent_runs_on_the_host(probed: dict[str, tuple[int, str]]) -> None:
    code, out = probed["nsenter"]
    assert code == 0 and "util-linux" in out, out
    code, out = probed["sh"]
    assert code == 0 and out.strip() == "from-sh", out


def test_image_is_small_and_carries_no_build_tools(image: images.BuiltImage,
                                                   probed: dict[str, tuple[int, str]]) -> None:
    print(f"\nimage size {image.size / 1e6:.1f} MB (docker image inspect), tar {image.tar_size / 1e6:.1f} MB")
    code, out = probed["pip"]
    assert code != 0 and "No module named pip" in out, out
    code, out = probed["build-tools"]
    assert code != 0 and "/" not in out.replace("/root/.cache", "").replace("/home/*/.cache", ""), out
    assert image.size < 400e6, f"{image.describe()}: the runtime stage should hold the base and the venv only"


# Importing the tar into containerd 1.6 and 2.x, and running it there, is test_install.py's first step: every node
# of the kubelet cluster loads it and runs the agent and the operator from it.


def test_a_second_revision_is_a_new_image_id_with_the_same_layers(dockerd: DockerdNode,
                                                                  image: images.BuiltImage) -> None:
    second = images.ensure_image(dockerd, tag=f"{TAG}-r2", revision=2)
    print(f"\nsecond revision: {second.describe()}")
    assert second.image_id != image.image_id
    assert second.reference == f"regmirror:{TAG}-r2" and Path(second.tar).exists()
    first_doc, second_doc = dockerd.image_inspect(image.reference), dockerd.image_inspect(second.reference)
    assert first_doc is not None and second_doc is not None
    assert second_doc["RootFS"]["Layers"] == first_doc["RootFS"]["Layers"]
    assert second_doc["Config"]["Labels"][images.REVISION_LABEL] == "2", json.dumps(second_doc["Config"])
    assert second_doc["Config"]["User"] == "10001"
