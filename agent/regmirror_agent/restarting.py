"""Restarting (or reloading) the node's runtime, and proving it came back healthy.

containerd re-reads config.toml only at start, and has no reload signal. "The process is up" proves nothing:
containerd keeps running when its CRI plugin fails, and kubelet then cannot start pods. So health means
``ctr plugins ls`` shows the CRI plugin ``ok``. Docker reloads ``registry-mirrors`` on SIGHUP
(``systemctl reload docker``); no restart is needed there.

Host commands run directly, or, from a pod with ``hostPID``, inside PID 1's namespaces through ``nsenter``
(as kured does), so ``systemctl`` and ``ctr`` are the host's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time

NSENTER = ("nsenter", "--target", "1", "--mount", "--uts", "--ipc", "--net", "--pid", "--")


class RestartFailed(Exception):
    """The runtime could not be restarted, or did not come back healthy."""


def in_host_namespaces() -> bool:
    """False inside a container, where host commands must go through nsenter into PID 1."""
    try:
        return os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    except OSError:
        return True


@dataclasses.dataclass(frozen=True)
class Host:
    """Runs commands as the node would: directly, or in PID 1's namespaces when we are in a pod."""

    nsenter: bool = False

    @classmethod
    def detect(cls) -> Host:
        return cls(nsenter=not in_host_namespaces())

    def argv(self, argv: list[str]) -> list[str]:
        return [*NSENTER, *argv] if self.nsenter else argv

    def has(self, binary: str) -> bool:
        if self.nsenter:
            return self.run(["sh", "-c", f"command -v {binary}"], timeout=10).returncode == 0
        return shutil.which(binary) is not None

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError as exc:
            return subprocess.CompletedProcess(argv, 127, "", str(exc))
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout:.0f}s: {exc}")


def server_pid(host: Host, address: str) -> int | None:
    """The pid of the process serving the unix socket ``address`` on the node (``SO_PEERCRED``), or None when
    it cannot be told. From a pod, the node's paths are seen through ``/proc/1/root`` (PID 1 is the host's with
    ``hostPID``), and the pid is the host's."""
    path = f"/proc/1/root{address}" if host.nsenter else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(path)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = int(struct.unpack("3i", creds)[0])
    return pid or None  # 0: the server is in a PID namespace we cannot see


def containerd_version(host: Host) -> tuple[int, ...] | None:
    """``containerd --version`` as numbers, or None when containerd is not installed where we can run it."""
    if not host.has("containerd"):
        return None
    return parse_containerd_version(host.run(["containerd", "--version"], timeout=10).stdout)


def parse_containerd_version(out: str) -> tuple[int, ...] | None:
    """``containerd github.com/containerd/containerd 1.6.20~ds1 ...`` or ``.../v2 v2.3.7 ...`` as numbers."""
    match = re.search(r"\sv?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else None


def cri_health(host: Host, address: str) -> tuple[bool, str]:
    """Is containerd's CRI plugin loaded? ``(ok, detail)``; detail quotes the plugin's own error."""
    result = host.run(["ctr", "--address", address, "plugins", "ls"], timeout=10)
    if result.returncode != 0:
        return False, f"containerd does not answer on {address}: {(result.stderr or result.stdout).strip()}"
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "io.containerd.grpc.v1" and fields[1] == "cri":
            if fields[-1] == "ok":
                return True, "CRI plugin ok"
            detailed = host.run(["ctr", "--address", address, "plugins", "ls", "--detailed"], timeout=10).stdout
            return False, f"CRI plugin {fields[-1]}: {_cri_error(detailed) or 'no detail'}"
    return False, "containerd runs without a CRI plugin (kubelet cannot use it)"


def _cri_error(detailed: str) -> str:
    """The message of the CRI block in ``ctr plugins ls --detailed`` ("Error:" then "Code:"/"Message:")."""
    for entry in re.split(r"\n(?=Type:)", detailed):
        if re.search(r"Type:\s+io\.containerd\.grpc\.v1\b", entry) and re.search(r"ID:\s+cri\b", entry):
            match = re.search(r"Message:\s*(.+)", entry) or re.search(r"Error:\s*(\S.+)", entry)
            return match.group(1).strip() if match else ""
    return ""


def wait_cri_healthy(host: Host, address: str, timeout: float) -> tuple[bool, str]:
    """Poll until the CRI plugin is ok. A socket that is not up yet may come; an errored plugin will not,
    so that answer is final after a short grace."""
    start = time.monotonic()
    while True:
        ok, detail = cri_health(host, address)
        elapsed = time.monotonic() - start
        if ok or elapsed >= timeout or (detail.startswith("CRI plugin") and elapsed >= 2):
            return ok, detail
        time.sleep(0.2)


def restart_runtime(host: Host, runtime: str, how: str, *, verb: str = "restart") -> str:
    """Restart (or, ``verb``, reload) the runtime as ``how`` says; return what was run."""
    if how.startswith("command:"):
        cmd = how[len("command:"):]
        result = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise RestartFailed(f"restart command {cmd!r} exited {result.returncode}: "
                                f"{(result.stderr or result.stdout).strip()[-500:]}")
        return cmd
    if how == "auto" and not host.has("systemctl"):
        raise RestartFailed(f"cannot restart {runtime}: no systemd on this node; "
                            f"pass --restart command:CMD (or --restart never and restart it yourself)")
    argv = ["systemctl", verb, runtime]
    result = host.run(argv, timeout=120)
    if result.returncode != 0:
        raise RestartFailed(f"{' '.join(argv)} exited {result.returncode}: {(result.stderr or result.stdout).strip()}")
    return " ".join(argv)


def docker_mirrors(host: Host, docker_host: str | None) -> tuple[list[str] | None, str]:
    """The registry mirrors the running dockerd uses, as ``docker info`` reports them (no trailing slash)."""
    argv = ["docker", *(["--host", docker_host] if docker_host else []), "info", "--format",
            "{{json .RegistryConfig.Mirrors}}"]
    result = host.run(argv, timeout=15)
    if result.returncode != 0:
        return None, f"docker info failed: {(result.stderr or result.stdout).strip()[-300:]}"
    try:
        return [str(m).rstrip("/") for m in json.loads(result.stdout) or []], ""
    except ValueError:
        return None, f"docker info answered {result.stdout.strip()[:200]!r}"


def wait_docker_mirrors(host: Host, docker_host: str | None, expected: list[str], timeout: float) -> str:
    """'' once dockerd reports ``expected``; else why not. A SIGHUP reload is asynchronous and dockerd only
    logs a refused reload (for example when --registry-mirror is also on its command line)."""
    want = [u.rstrip("/") for u in expected]
    deadline = time.monotonic() + timeout
    while True:
        actual, problem = docker_mirrors(host, docker_host)
        if actual == want:
            return ""
        if time.monotonic() >= deadline:
            return problem or (f"dockerd still uses registry-mirrors {actual} after the reload, not {want}; dockerd "
                               f"refuses a reload when --registry-mirror is also given on its command line (its "
                               f"log says why)")
        time.sleep(0.2)
