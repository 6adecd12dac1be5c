"""A real, throwaway dockerd (Debian's docker.io 20.10) for one simulated Docker node.

Why a real dockerd: what matters about ``registry-mirrors`` is whether dockerd reloads it on SIGHUP and then
pulls Docker Hub images through the mirror. Only dockerd can answer that.

Layout of one node:

* ``node_root/etc/docker/daemon.json`` - the node's ``/etc/docker/daemon.json``; the product edits it and
  dockerd reads it with ``--config-file`` (re-read on every SIGHUP).
* ``run_dir`` - a short private dir (``/tmp/rdk-XXXX``, unix socket paths are limited to 107 bytes):
  ``data`` (``--data-root``, images), ``exec`` (``--exec-root``; the managed containerd's socket, state and
  config live in ``exec/containerd``), ``docker.sock``, ``docker.pid``, ``dockerd.log``, ``cli`` (the docker
  client's ``DOCKER_CONFIG``) and ``etc-docker``, ``run``, ``opt-containerd`` (see below).

Isolation from the host. dockerd runs in its own mount namespace (``unshare --mount --propagation private``;
the pid stays the same all the way to dockerd), where:

* ``run_dir/etc-docker`` is bind-mounted over ``/etc/docker``: dockerd 20.10 writes its trust key to
  ``/etc/docker/key.json`` whatever the flags say (``deprecated-key-path``, no ``--trustkey`` flag any more) and
  looks for registry certificates in ``/etc/docker/certs.d``;
* ``run_dir/run`` is bind-mounted over ``/run``: dockerd uses the *system* containerd when
  ``/run/containerd/containerd.sock`` exists, and creates ``/run/docker/plugins``. With a private ``/run`` it
  always starts its own managed containerd, a child whose socket, root and state are under ``run_dir``;
* ``run_dir/opt-containerd`` is bind-mounted over ``/opt/containerd`` (when the host has one): containerd's
  ``opt`` plugin default, the one host path the managed containerd would otherwise write.

Every mount (including the bind of ``--data-root`` onto itself that dockerd makes for mount propagation) lives
and dies with that namespace. Host networking is shared (the mirror is a registry on 127.0.0.1), so the flags
make dockerd leave it alone: ``--bridge=none`` (no docker0, no veth), ``--iptables=false``,
``--ip6tables=false``, ``--ip-masq=false``, ``--ip-forward=false`` (dockerd otherwise sets the host's
``net.ipv4.ip_forward=1`` even with ``--bridge=none``). ``--storage-driver=vfs`` needs no overlay mounts.

Cleanup never leaks processes: dockerd and everything it starts carry ``REGMIRROR_HARNESS_DOCKERD=<run_dir>``
in their environment (the managed containerd inherits dockerd's), and :meth:`DockerdNode.stop` SIGTERMs
dockerd, then SIGKILLs anything still carrying the marker. It raises if a process, a mount under ``run_dir`` or
a new network interface is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tests.harness.containerd import find_binary

DOCKERD_BIN = os.environ.get("REGMIRROR_DOCKERD_BIN", "dockerd")
# The Debian client matches the daemon's API; another client may be first on PATH (e.g. /usr/local/bin/docker).
DOCKER_BIN = os.environ.get("REGMIRROR_DOCKER_BIN", "/usr/bin/docker")
DOCKER_CONTAINERD_BIN = "containerd"  # what dockerd starts as its managed containerd (looked up on PATH)
DOCKERD_ENV_MARKER = "REGMIRROR_HARNESS_DOCKERD"

# Mounted privately in dockerd's namespace: (host path, folder of run_dir, needed even if the host lacks it).
_PRIVATE_MOUNTS: tuple[tuple[str, str, bool], ...] = (
    ("/etc/docker", "etc-docker", True),
    ("/run", "run", True),
    ("/opt/containerd", "opt-containerd", False),
)

DOCKERD_FLAGS: tuple[str, ...] = (
    "--iptables=false",
    "--ip6tables=false",
    "--ip-masq=false",
    "--ip-forward=false",
    "--bridge=none",
    "--storage-driver=vfs",
)


def resolve_binary(name: str) -> Path | None:
    """An absolute path is taken as is; a bare name is looked up like the other harness binaries."""
    if os.path.isabs(name):
        return Path(name) if os.path.isfile(name) and os.access(name, os.X_OK) else None
    return find_binary(name)


def missing_docker_binaries() -> list[str]:
    """What a DockerdNode needs and this machine lacks (named as the test should report them)."""
    needed = [DOCKERD_BIN, DOCKER_BIN, DOCKER_CONTAINERD_BIN, "unshare", "mount", "sh"]
    return [n for n in needed if resolve_binary(n) is None]


def _interfaces() -> set[str]:
    try:
        return set(os.listdir("/sys/class/net"))
    except OSError:
        return set()


def _marked_pids(marker: bytes) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``marker`` (a zombie's environ reads empty)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            pids.append(int(p.name))
    return pids


def _kill_marked(marker: bytes, timeout: float = 5.0) -> None:
    for pid in _marked_pids(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.05)


def _finalize(proc: subprocess.Popen[bytes], marker: bytes) -> None:
    """Safety net when a node is garbage-collected or the interpreter exits without stop(); never raises."""
    with contextlib.suppress(Exception):  # last resort at interpreter exit
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        _kill_marked(marker)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


class _UnixHTTPConnection:
    """Just enough HTTP/1.0 over a unix socket to ask dockerd ``GET /_ping`` while it starts."""

    @staticmethod
    def get(sock_path: Path, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        raw = b"".join(chunks)
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        return status, body


class DockerdNode:
    """One simulated Docker node: ``node_root/etc/docker/daemon.json`` and a private dockerd reading it.

    ``DockerdNode(node_root, extra_flags=[...])`` creates the folders (``extra_flags`` are the node's own dockerd
    flags, e.g. ``--registry-mirror``, which daemon.json may then not repeat); write daemon.json with
    :meth:`write_daemon_json`, then :meth:`start`. Use it as a context manager, or call :meth:`stop` (idempotent;
    also cleans ``run_dir`` with :meth:`close`). :meth:`reload_command` is what the product's
    ``--restart command:`` should run.
    """

    def __init__(self, node_root: Path, run_dir: Path | None = None, *, name: str = "docker-node",
                 extra_flags: Sequence[str] = ()) -> None:
        self.name = name
        self.extra_flags = tuple(extra_flags)  # the node's own dockerd flags (its unit's ExecStart / DOCKER_OPTS)
        self.node_root = Path(node_root).resolve()
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="rdk-", dir="/tmp")).resolve()
        if len(str(self.exec_root / "containerd" / "containerd.sock.ttrpc")) > 100:
            raise ValueError(f"run dir {self.run_dir} too long for unix socket paths")
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        for folder in ("data", "exec", "cli", *(m[1] for m in _PRIVATE_MOUNTS)):
            (self.run_dir / folder).mkdir(parents=True, exist_ok=True)
        self.marker = f"{DOCKERD_ENV_MARKER}={self.run_dir}".encode()
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., DockerdNode] | None = None
        self._interfaces_before: set[str] = set()

    # ---- paths -------------------------------------------------------------
    @property
    def etc_dir(self) -> Path:
        """The node's /etc/docker, as seen from the host."""
        return self.node_root / "etc" / "docker"

    @property
    def daemon_json(self) -> Path:
        return self.etc_dir / "daemon.json"

    @property
    def data_root(self) -> Path:
        return self.run_dir / "data"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "dockerd.log"

    @property
    def host_uri(self) -> str:
        return f"unix://{self.socket}"

    # ---- config ------------------------------------------------------------
    def write_daemon_json(self, text: str | dict[str, Any]) -> Path:
        """Write the node's daemon.json verbatim (a dict is dumped compactly, as a hand-written file)."""
        if not isinstance(text, str):
            text = json.dumps(text)
        self.daemon_json.write_text(text)
        return self.daemon_json

    # ---- lifecycle ---------------------------------------------------------
    def argv(self) -> list[str]:
        """The whole command line: unshare, the private mounts, then dockerd (same pid throughout)."""
        dockerd = resolve_binary(DOCKERD_BIN)
        if dockerd is None:
            raise FileNotFoundError(f"dockerd not found ({DOCKERD_BIN}); apt-get install docker.io")
        mounts = []
        for target, folder, always in _PRIVATE_MOUNTS:
            if always or os.path.isdir(target):
                mounts.append(f"mount --bind {shlex.quote(str(self.run_dir / folder))} {shlex.quote(target)}")
        dockerd_argv = [
            str(dockerd),
            "--config-file", str(self.daemon_json),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pid_path),
            "--host", self.host_uri,
            *DOCKERD_FLAGS,
            *self.extra_flags,
        ]
        inner = " && ".join([*mounts, "exec " + shlex.join(dockerd_argv)])
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]

    def start(self, timeout: float = 30.0) -> None:
        """Start dockerd and return once its API answers ``/_ping``; raise with the log tail if it does not."""
        if self.running:
            raise RuntimeError(f"dockerd of {self.run_dir} already running")
        if not self.daemon_json.exists():
            raise FileNotFoundError(f"{self.daemon_json}: call write_daemon_json() first")
        missing = missing_docker_binaries()
        if missing:
            raise FileNotFoundError(f"missing for a real dockerd: {', '.join(missing)}")
        self._interfaces_before = _interfaces()
        env = {**os.environ, DOCKERD_ENV_MARKER: str(self.run_dir)}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log_path, "ab") as log:
            log.write(f"=== regmirror harness: start {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ===\n"
                      .encode())
            log.flush()
            self._proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._finalizer = weakref.finalize(self, _finalize, self._proc, self.marker)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self._proc.returncode} while starting:\n{self.log_tail()}")
            try:
                status, body = _UnixHTTPConnection.get(self.socket, "/_ping")
                if status == 200 and body.strip() == b"OK":
                    if self.pid != self._proc.pid:
                        raise RuntimeError(f"dockerd pid file says {self.pid}, the harness started {self._proc.pid}")
                    return
                last = f"/_ping answered {status} {body[:200]!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"dockerd did not answer within {timeout}s ({last}):\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """dockerd's pid, from its own ``--pidfile`` (what the reload command signals)."""
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def node_pids(self) -> list[int]:
        """Every live process of this node: dockerd, its managed containerd and anything they started."""
        return _marked_pids(self.marker)

    @property
    def running(self) -> bool:
        return bool(self.node_pids())

    def reload_command(self) -> str:
        """The node's ``systemctl reload docker``: SIGHUP to the pid in dockerd's pid file."""
        return f"kill -HUP $(cat {shlex.quote(str(self.pid_path))})"

    def reload(self) -> None:
        """SIGHUP dockerd, as the reload command does (dockerd re-reads daemon.json asynchronously)."""
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"no dockerd pid in {self.pid_path}")
        os.kill(pid, signal.SIGHUP)

    def reload_count(self) -> int:
        """How many reloads dockerd has logged (``Got signal to reload configuration``)."""
        return self.log_text().count("Got signal to reload configuration")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM dockerd (it stops its managed containerd), SIGKILL what is left; raise on any leftover."""
        problems: list[str] = []
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._proc.pid, signal.SIGTERM)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    problems.append(f"dockerd did not stop within {timeout}s of SIGTERM (killed)")
                    self._proc.kill()
                    self._proc.wait(5)
            deadline = time.monotonic() + 10
            while self.node_pids() and time.monotonic() < deadline:  # containerd exits right after dockerd
                time.sleep(0.05)
            if self.node_pids():
                problems.append(f"processes outlived dockerd (killed): {self._describe(self.node_pids())}")
                _kill_marked(self.marker)
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            self._proc = None
        if self.node_pids():
            problems.append(f"processes could not be killed: {self._describe(self.node_pids())}")
        leaked_mounts = self.host_mounts()
        if leaked_mounts:
            problems.append(f"mounts under {self.run_dir} visible on the host: {leaked_mounts}")
        new_links = sorted(_interfaces() - self._interfaces_before) if self._interfaces_before else []
        if new_links:
            problems.append(f"network interfaces appeared while dockerd ran: {new_links}")
        if problems:
            raise RuntimeError(f"dockerd teardown of {self.run_dir}: " + "; ".join(problems))

    def close(self) -> None:
        """Stop, then delete ``run_dir`` if this object created it (only once nothing is mounted there)."""
        try:
            self.stop()
        finally:
            if self._own_run_dir and not self.host_mounts() and not self.running:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host_mounts(self) -> list[str]:
        """Mount points under run_dir in the host's (our) mount namespace; always empty when all is well."""
        try:
            lines = Path("/proc/self/mounts").read_text().splitlines()
        except OSError:
            return []
        prefix = str(self.run_dir)
        return [f.split()[1] for f in lines if len(f.split()) > 1 and
                (f.split()[1] == prefix or f.split()[1].startswith(prefix + "/"))]

    @staticmethod
    def _describe(pids: Sequence[int]) -> str:
        out = []
        for pid in pids:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            out.append(f"{pid} {cmd.strip()}")
        return ", ".join(out)

    # ---- the docker client -------------------------------------------------
    def docker(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the Debian docker client against this node's socket, with a private client config dir."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_") and k != DOCKERD_ENV_MARKER}
        env["DOCKER_CONFIG"] = str(self.run_dir / "cli")
        try:
            return subprocess.run([DOCKER_BIN, "--host", self.host_uri, *args], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL, env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return subprocess.CompletedProcess(exc.cmd, 124, out, f"timed out after {timeout}s")

    def info(self) -> dict[str, Any]:
        """``docker info`` as JSON (raises if the daemon does not answer)."""
        res = self.docker("info", "--format", "{{json .}}", timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"docker info failed ({res.returncode}): {res.stderr}{res.stdout}")
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc

    def info_text(self) -> str:
        """``docker info`` as a person reads it (the ``Registry Mirrors:`` block)."""
        res = self.docker("info", timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"docker info failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res.stdout

    def mirrors(self) -> list[str]:
        """``Registry Mirrors`` of ``docker info`` (dockerd normalizes each to ``scheme://host:port/``)."""
        return list(self.info().get("RegistryConfig", {}).get("Mirrors") or [])

    def wait_mirrors(self, expected: Sequence[str], timeout: float = 15.0) -> list[str]:
        """Poll ``docker info`` until its mirrors are ``expected`` (a SIGHUP reload is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.mirrors()
            if got == list(expected) or time.monotonic() >= deadline:
                return got
            time.sleep(0.1)

    def pull(self, image: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.docker("pull", image, timeout=timeout)

    def image_inspect(self, image: str) -> dict[str, Any] | None:
        res = self.docker("image", "inspect", image, timeout=30)
        if res.returncode != 0:
            return None
        docs: list[dict[str, Any]] = json.loads(res.stdout)
        return docs[0] if docs else None

    def remove_image(self, image: str) -> None:
        res = self.docker("image", "rm", "--force", image, timeout=60)
        if res.returncode != 0 and "No such image" not in res.stderr:
            raise RuntimeError(f"docker image rm {image} failed: {res.stderr}")

    # ---- logs --------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"DockerdNode({self.name!r}, root={self.node_root}, run_dir={self.run_dir}, pid={self.pid})"


__all__ = ["DOCKERD_BIN", "DOCKERD_FLAGS", "DOCKER_BIN", "DockerdNode", "missing_docker_binaries"]
