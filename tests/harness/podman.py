"""A real podman (Debian's 4.3) reading one simulated CRI-O node's ``/etc/containers``.

Why podman: CRI-O is not packaged in Debian 12, but podman pulls with the same containers/image library and reads
the same ``registries.conf``, ``registries.conf.d/*.conf`` and ``certs.d`` (its User-Agent says so:
``containers/5.23.1 (github.com/containers/image)``). A pull that succeeds here, with no internet, came through the
mirror the node's files name.

Isolation: each pull runs in its own mount namespace (``unshare --mount --propagation private``) where the node's
``etc/containers`` is bind-mounted over ``/etc/containers``, so podman reads the node's files at their real paths,
through no flag or environment variable a node would not have; the namespace and its mount end with the pull.
Images go to a private store (``--root``/``--tmpdir`` under ``workdir``, ``--runroot`` a short temp folder, the
``vfs`` driver, no mounts); no container is ever run, so no process outlives the command.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

PODMAN_BIN = os.environ.get("REGMIRROR_PODMAN_BIN", "podman")
#: The node's own signature policy: without one podman refuses every pull.
POLICY_JSON = '{"default": [{"type": "insecureAcceptAnything"}]}\n'
# A CRI-O node's own files: hand-written (comments, odd spacing, an entry of its own for quay.io, no final
# newline), so a byte-identical reset can only come from leaving them alone.
NODE_REGISTRIES_CONF = (
    "# site registries (ops ticket 12)\n"
    'unqualified-search-registries = ["registry.example.com"]\n'
    "\n"
    "[[registry]]\n"
    'prefix   = "quay.io"\n'
    'location = "quay.io"  # the node\'s own entry: regmirror\'s replaces it while set'
)
NODE_CRIO_CONF = '[crio]\n  log_dir = "/var/log/crio/pods"\n[crio.runtime]\n  default_runtime = "runc"\n'


def missing_podman_binaries() -> list[str]:
    return [name for name in (PODMAN_BIN, "unshare", "mount", "sh") if shutil.which(name) is None]


def write_crio_node(root: Path) -> Path:
    """A CRI-O node's root: its crio.conf (what makes it a CRI-O node), registries.conf and signature policy."""
    (root / "etc/crio").mkdir(parents=True)
    (root / "etc/crio/crio.conf").write_text(NODE_CRIO_CONF)
    (root / "etc/containers").mkdir(parents=True)
    (root / "etc/containers/registries.conf").write_text(NODE_REGISTRIES_CONF)
    (root / "etc/containers/policy.json").write_text(POLICY_JSON)
    return root


class Podman:
    """podman as a client of one node root's ``/etc/containers``; nothing of the host's is read or written."""

    def __init__(self, node_root: Path, workdir: Path) -> None:
        self.node_root = node_root
        self.workdir = workdir
        self.etc = node_root / "etc" / "containers"
        # podman refuses a runroot longer than 50 characters; pytest's tmp paths are longer.
        self.run_dir = Path(tempfile.mkdtemp(prefix="rpm-"))

    def close(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _argv(self, *args: str) -> list[str]:
        store = self.workdir
        podman = [PODMAN_BIN, "--root", str(store / "root"), "--runroot", str(self.run_dir), "--tmpdir",
                  str(store / "tmp"), "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                  "--events-backend", "file", *args]
        script = f"mount --bind {shlex.quote(str(self.etc))} /etc/containers && exec {shlex.join(podman)}"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if not self.etc.is_dir():
            raise RuntimeError(f"{self.etc} is missing: the node has no /etc/containers for podman to read")
        for sub in ("root", "tmp", "home"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(self.workdir / "home"),
               "TMPDIR": str(self.workdir / "tmp")}  # HOME: no user registries.conf of the host's is read
        return subprocess.run(self._argv(*args), capture_output=True, text=True, timeout=timeout, check=False,
                              env=env)

    def pull(self, image: str) -> subprocess.CompletedProcess[str]:
        return self.run("pull", image)

    def remove_image(self, image: str) -> None:
        self.run("rmi", "--force", image)

    def image_digest(self, image: str) -> str | None:
        result = self.run("image", "inspect", "--format", "{{.Digest}}", image)
        return result.stdout.strip() if result.returncode == 0 else None
