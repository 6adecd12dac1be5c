"""Simulated nodes, each running a real containerd (Debian 1.6.x, or 2.x built from its Go module).

Why real containerd: what matters about a mirror configuration is whether the
node's CRI plugin loads it and pulls through the mirror.  Only containerd can
answer that (for instance, inline ``mirrors`` beside ``config_path`` starts
containerd but fails the CRI plugin).

Layout of one node:

* ``node_root/etc/containerd/`` - the node's ``/etc/containerd`` (``config.toml``,
  ``certs.d/<host>/hosts.toml``).  The product under test edits files here.
* ``state_dir`` - private runtime dir: containerd ``root``/``state``, the gRPC
  socket, ``launch.sh``, ``containerd.pid`` and ``containerd.log``.  Kept short
  (``/tmp/rmn-XXXX``) because unix socket paths are limited to 107 bytes.

containerd runs in its own mount namespace where ``node_root/etc/containerd`` is
bind-mounted over ``/etc/containerd``.  A node's config can therefore say
``config_path = "/etc/containerd/certs.d"`` exactly like production, and each
node sees only its own hosts files.  Everything that is a host path in
config.toml (root, state, sockets) points into ``state_dir``, which needs no
mount trick, so the product can read ``[grpc] address`` from config.toml and
talk to the socket directly.

Start/stop always go through ``containerd_ctl.sh`` (also used by the product's
``--restart command:...``), so a test has a single start path.

Which containerd: by default ``containerd``/``ctr`` from ``$PATH`` (Debian's 1.6,
or ``$REGMIRROR_CONTAINERD_BIN``/``$REGMIRROR_CTR_BIN``).  A node made with
``binaries_dir`` runs that folder's ``containerd`` and ``ctr`` instead; containerd
2.x lives in :func:`containerd2_dir` (``.cache/bin/containerd2``, built by
hack/build-control-plane.sh), a folder of its own so it never shadows 1.6 on
``$PATH``.  :meth:`ContainerdNode.env` puts that folder first on ``PATH`` for the
product, whose own ``ctr``/``containerd`` calls must find the node's binaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
REPO_ROOT = HARNESS_DIR.parent.parent
CTL_SCRIPT = HARNESS_DIR / "containerd_ctl.sh"
NODE_ENV_MARKER = "REGMIRROR_HARNESS_NODE"

CONTAINERD_BIN = os.environ.get("REGMIRROR_CONTAINERD_BIN", "containerd")
CTR_BIN = os.environ.get("REGMIRROR_CTR_BIN", "ctr")
#: Flavor name -> sub-folder of the binaries cache holding that containerd's ``containerd`` and ``ctr``.
FLAVOR_DIRS = {"2.x": "containerd2"}

# Where the node's own etc/containerd appears inside its mount namespace.
NODE_ETC_IN_NS = "/etc/containerd"
CERTS_D_IN_NS = NODE_ETC_IN_NS + "/certs.d"

CRI_PLUGIN_V1 = "cri"
CRI_PLUGIN_V2 = '"io.containerd.grpc.v1.cri"'
OPT_PLUGIN_V1 = "opt"
OPT_PLUGIN_V2 = '"io.containerd.internal.v1.opt"'
# Version 3 (containerd 2.x): the CRI image settings (snapshotter, registry) have a plugin of their own.
# Written with literal-string keys, as ``containerd config default`` of 2.x does.
CRI_IMAGES_PLUGIN_V3 = "'io.containerd.cri.v1.images'"
OPT_PLUGIN_V3 = "'io.containerd.internal.v1.opt'"
NRI_PLUGIN_V3 = "'io.containerd.nri.v1.nri'"
TRANSFER_PLUGIN_V3 = "'io.containerd.transfer.v1.local'"


def find_binary(name: str) -> Path | None:
    """Locate a helper binary built for the tests (crictl, etcd, ...).

    Order: ``$REGMIRROR_BIN_DIR``, the repo's git-ignored ``.cache/bin``
    (where hack/build-control-plane.sh builds them), then ``$PATH``.
    """
    candidates: list[Path] = []
    if os.environ.get("REGMIRROR_BIN_DIR"):
        candidates.append(Path(os.environ["REGMIRROR_BIN_DIR"]) / name)
    candidates.append(REPO_ROOT / ".cache" / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    return Path(found) if found else None


def containerd2_dir() -> Path:
    """Where containerd 2.x's ``containerd`` and ``ctr`` are: ``$REGMIRROR_CONTAINERD2_DIR``, else
    ``.cache/bin/containerd2`` (hack/build-control-plane.sh, stage ``containerd2``)."""
    return flavor_dir("2.x")


def flavor_dir(flavor: str) -> Path:
    """The binaries folder of a containerd flavor (``"2.x"``); see :data:`FLAVOR_DIRS`."""
    if flavor not in FLAVOR_DIRS:
        raise ValueError(f"unknown containerd flavor {flavor!r}; known: {', '.join(FLAVOR_DIRS)}")
    env = os.environ.get(f"REGMIRROR_{FLAVOR_DIRS[flavor].upper()}_DIR")
    return Path(env) if env else REPO_ROOT / ".cache" / "bin" / FLAVOR_DIRS[flavor]


def _toml_str(s: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for our inputs.
    return json.dumps(s)


def _toml_literal(s: str) -> str:
    """A TOML literal string ('...'), the quoting containerd 2.x's ``config default`` uses."""
    if "'" in s or "\n" in s:
        return _toml_str(s)
    return f"'{s}'"


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml_str(i) for i in items) + "]"


def render_config(
    version: int,
    state_dir: Path,
    *,
    config_path: str | None = None,
    mirrors: Mapping[str, Sequence[str]] | None = None,
    extra: str = "",
) -> str:
    """A starting config.toml for a node whose runtime files live in ``state_dir``.

    ``version`` 1 writes no ``version`` key and short plugin names
    (``[plugins.cri]``), like old kubeadm/Debian nodes; ``version`` 2 writes
    ``version = 2`` and ``[plugins."io.containerd.grpc.v1.cri"]``; ``version`` 3
    (containerd 2.x only) writes ``version = 3``, the CRI image settings in
    ``[plugins.'io.containerd.cri.v1.images']`` and literal strings, as 2.x's
    ``containerd config default`` does.

    Isolation choices (so many containerds run side by side):

    * ``root``, ``state``, ``[grpc] address`` and ``[ttrpc] address`` live in
      ``state_dir`` (the ttrpc default is derived from the grpc address, but
      being explicit keeps the product honest about preserving it);
    * the CRI snapshotter is ``native`` (no overlay mounts needed);
    * the opt plugin path is private (its default, /opt/containerd, is shared);
    * the CRI streaming server is left at its 1.6 default,
      ``stream_server_address = "127.0.0.1"``, ``stream_server_port = "0"``:
      port 0 means an ephemeral port, so nodes never collide on it (2.x keeps
      that default in ``[plugins.'io.containerd.grpc.v1.cri']``);
    * version 3 only: the NRI socket (on by default in 2.x, shared
      ``/var/run/nri/nri.sock``) lives in ``state_dir`` too; and since CRI pulls
      go through the transfer service from 2.1, whose built-in unpack
      configuration names only overlayfs (a pull then fails: "no unpack platforms
      defined"), an ``unpack_config`` entry names ``native`` for this platform.

    ``config_path``/``mirrors`` render the CRI ``registry`` table in the
    schema's own spelling; ``extra`` is appended verbatim.
    """
    if version == 3:
        return _render_config_v3(state_dir, config_path=config_path, mirrors=mirrors, extra=extra)
    if version not in (1, 2):
        raise ValueError(f"containerd config versions are 1 and 2 (1.6) or 3 (2.x), not {version}")
    cri = CRI_PLUGIN_V1 if version == 1 else CRI_PLUGIN_V2
    opt = OPT_PLUGIN_V1 if version == 1 else OPT_PLUGIN_V2
    sd = Path(state_dir)
    lines: list[str] = []
    if version == 2:
        lines += ["version = 2", ""]
    lines += [
        f"root = {_toml_str(str(sd / 'root'))}",
        f"state = {_toml_str(str(sd / 'state'))}",
        "",
        "[grpc]",
        f"  address = {_toml_str(str(sd / 'containerd.sock'))}",
        "",
        "[ttrpc]",
        f"  address = {_toml_str(str(sd / 'containerd.sock.ttrpc'))}",
        "",
        "[plugins]",
        f"  [plugins.{opt}]",
        f"    path = {_toml_str(str(sd / 'opt'))}",
        f"  [plugins.{cri}]",
        f"    [plugins.{cri}.containerd]",
        '      snapshotter = "native"',
    ]
    if config_path is not None or mirrors:
        lines.append(f"    [plugins.{cri}.registry]")
        if config_path is not None:
            lines.append(f"      config_path = {_toml_str(config_path)}")
        for host, endpoints in (mirrors or {}).items():
            lines.append(f"      [plugins.{cri}.registry.mirrors.{_toml_str(host)}]")
            lines.append(f"        endpoint = {_toml_list(list(endpoints))}")
    text = "\n".join(lines) + "\n"
    if extra:
        text += "\n" + extra.rstrip("\n") + "\n"
    return text


def _render_config_v3(
    state_dir: Path,
    *,
    config_path: str | None,
    mirrors: Mapping[str, Sequence[str]] | None,
    extra: str,
) -> str:
    """:func:`render_config` for ``version = 3`` (containerd 2.x)."""
    lit = _toml_literal
    images = CRI_IMAGES_PLUGIN_V3
    sd = Path(state_dir)
    lines = [
        "version = 3",
        "",
        f"root = {lit(str(sd / 'root'))}",
        f"state = {lit(str(sd / 'state'))}",
        "",
        "[grpc]",
        f"  address = {lit(str(sd / 'containerd.sock'))}",
        "",
        "[ttrpc]",
        f"  address = {lit(str(sd / 'containerd.sock.ttrpc'))}",
        "",
        "[plugins]",
        f"  [plugins.{OPT_PLUGIN_V3}]",
        f"    path = {lit(str(sd / 'opt'))}",
        "",
        f"  [plugins.{NRI_PLUGIN_V3}]",
        f"    socket_path = {lit(str(sd / 'nri.sock'))}",
        "",
        f"  [plugins.{TRANSFER_PLUGIN_V3}]",
        f"    [[plugins.{TRANSFER_PLUGIN_V3}.unpack_config]]",
        f"      platform = {lit(_oci_platform())}",
        "      snapshotter = 'native'",
        "      differ = 'walking'",
        "",
        f"  [plugins.{images}]",
        "    snapshotter = 'native'",
    ]
    if config_path is not None or mirrors:
        lines += ["", f"    [plugins.{images}.registry]"]
        if config_path is not None:
            lines.append(f"      config_path = {lit(config_path)}")
        for host, endpoints in (mirrors or {}).items():
            lines.append(f"      [plugins.{images}.registry.mirrors.{lit(host)}]")
            lines.append(f"        endpoint = [{', '.join(lit(e) for e in endpoints)}]")
    text = "\n".join(lines) + "\n"
    if extra:
        text += "\n" + extra.rstrip("\n") + "\n"
    return text


def _oci_platform() -> str:
    """This machine as an OCI platform string (``linux/amd64``), as containerd's default platform."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)
    return f"linux/{arch}"


def render_hosts_toml(
    mirror_url: str,
    *,
    server: str | None = None,
    capabilities: Sequence[str] = ("pull", "resolve"),
    ca: str | None = None,
    skip_verify: bool | None = None,
) -> str:
    """A hosts.toml trying ``mirror_url`` first, then ``server`` (the upstream).

    ``[host."..."]`` is written as a real table header: containerd 2.x drops
    dotted/inline host keys, so the harness never relies on them.
    """
    lines = []
    if server:
        lines.append(f"server = {_toml_str(server)}")
        lines.append("")
    lines.append(f"[host.{_toml_str(mirror_url)}]")
    lines.append(f"  capabilities = {_toml_list(list(capabilities))}")
    if ca is not None:
        lines.append(f"  ca = {_toml_str(ca)}")
    if skip_verify is not None:
        lines.append(f"  skip_verify = {'true' if skip_verify else 'false'}")
    return "\n".join(lines) + "\n"


def default_upstream(host: str) -> str:
    """The real upstream URL for a registry host (Docker Hub's differs from its name)."""
    return "https://registry-1.docker.io" if host == "docker.io" else f"https://{host}"


def _text(out: str | bytes | None) -> str:
    """TimeoutExpired.stdout may be bytes even with text=True."""
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out


def _parse_plugins(text: str) -> dict[tuple[str, str], str]:
    """``ctr plugins ls`` table -> {(type, id): status}."""
    out: dict[tuple[str, str], str] = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3:
            out[(cols[0], cols[1])] = cols[-1]
    return out


def _parse_plugin_error(detail: str) -> str:
    """The ``Message:`` of ``ctr plugins ls -d`` (may continue on following lines)."""
    m = re.search(r"^\s*Message:\s*(.*?)\s*$", detail, re.MULTILINE)
    return m.group(1) if m else detail.strip()


class ContainerdNode:
    """One simulated node with its own containerd.

    Create it with a node root and a (short) state dir, write a config with
    :meth:`write_config`, then :meth:`start`.  :meth:`ctl_command` gives the
    shell command the product should run to restart this node's containerd.

    ``binaries_dir``: a folder holding the ``containerd`` and ``ctr`` this node
    uses (e.g. :func:`containerd2_dir`); default: ``CONTAINERD_BIN``/``CTR_BIN``.
    """

    def __init__(
        self, node_root: Path, state_dir: Path, *, name: str = "node", binaries_dir: Path | None = None
    ) -> None:
        self.name = name
        self.binaries_dir = Path(binaries_dir).resolve() if binaries_dir is not None else None
        self.containerd_bin = str(self.binaries_dir / "containerd") if self.binaries_dir else CONTAINERD_BIN
        self.ctr_bin = str(self.binaries_dir / "ctr") if self.binaries_dir else CTR_BIN
        self.node_root = Path(node_root).resolve()
        self.state_dir = Path(state_dir).resolve()
        if len(str(self.state_dir / "containerd.sock.ttrpc")) > 100:
            raise ValueError(f"state dir {self.state_dir} too long for a unix socket path")
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_launcher()

    # ---- paths -------------------------------------------------------------
    @property
    def etc_dir(self) -> Path:
        """The node's /etc/containerd, as seen from the host."""
        return self.node_root / "etc" / "containerd"

    @property
    def config_path(self) -> Path:
        return self.etc_dir / "config.toml"

    @property
    def certs_dir(self) -> Path:
        """The node's /etc/containerd/certs.d, as seen from the host (for ``ctr --hosts-dir``)."""
        return self.etc_dir / "certs.d"

    @property
    def socket(self) -> Path:
        """The gRPC socket the harness configs use (``[grpc] address``)."""
        return self.state_dir / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "containerd.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "containerd.pid"

    # ---- config ------------------------------------------------------------
    def write_config(
        self,
        version: int = 2,
        *,
        config_path: str | None = None,
        mirrors: Mapping[str, Sequence[str]] | None = None,
        extra: str = "",
    ) -> Path:
        """Write a starting config.toml (see :func:`render_config`); return its path."""
        self.config_path.write_text(
            render_config(version, self.state_dir, config_path=config_path, mirrors=mirrors, extra=extra)
        )
        return self.config_path

    def write_hosts_toml(
        self,
        host: str,
        mirror_url: str,
        *,
        server: str | None = None,
        with_server: bool = True,
        capabilities: Sequence[str] = ("pull", "resolve"),
        ca_pem: str | None = None,
        skip_verify: bool | None = None,
    ) -> Path:
        """Write ``certs.d/<host>/hosts.toml`` sending pulls of ``host`` to ``mirror_url``.

        ``server`` defaults to the real upstream of ``host`` (Docker Hub's is
        ``https://registry-1.docker.io``); ``with_server=False`` omits it.  ``ca_pem`` is stored next to the file as
        ``mirror-ca.crt`` and referenced by a path relative to the hosts
        directory, which resolves the same for ``ctr --hosts-dir`` on the host
        and for containerd inside the node's namespace.
        """
        d = self.certs_dir / host
        d.mkdir(parents=True, exist_ok=True)
        ca = None
        if ca_pem is not None:
            (d / "mirror-ca.crt").write_text(ca_pem)
            ca = "mirror-ca.crt"
        upstream = (server or default_upstream(host)) if with_server else None
        path = d / "hosts.toml"
        path.write_text(
            render_hosts_toml(mirror_url, server=upstream, capabilities=capabilities, ca=ca, skip_verify=skip_verify)
        )
        return path

    # ---- lifecycle ---------------------------------------------------------
    def _write_launcher(self) -> None:
        """launch.sh: the node's "systemd unit", run by containerd_ctl.sh.

        It records its own pid (which unshare, sh and containerd all inherit
        through exec) and bind-mounts the node's etc over /etc/containerd in a
        private mount namespace, invisible to the host and to other nodes.
        """
        inner = (
            f"mount --bind {shlex.quote(str(self.etc_dir))} {NODE_ETC_IN_NS} && "
            f"exec {shlex.quote(self.containerd_bin)} --config {NODE_ETC_IN_NS}/config.toml"
        )
        script = (
            "#!/bin/sh\n"
            "# Generated by tests/harness/containerd.py; started by containerd_ctl.sh.\n"
            f"echo $$ > {shlex.quote(str(self.pid_path))}\n"
            f"exec unshare --mount --propagation private sh -c {shlex.quote(inner)}\n"
        )
        launcher = self.state_dir / "launch.sh"
        launcher.write_text(script)
        launcher.chmod(0o755)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the product on this node: ``binaries_dir`` first on ``PATH``, so its ``ctr``
        and ``containerd`` calls reach this node's containerd, as on a real node of that version."""
        env = dict(os.environ if base is None else base)
        if self.binaries_dir is not None:
            env["PATH"] = os.pathsep.join([str(self.binaries_dir), env.get("PATH") or os.defpath])
        return env

    def ctl_command(self, action: str = "restart") -> str:
        """Shell command restarting/stopping/starting this node's containerd.

        For the product: ``--restart "command:" + node.ctl_command()``.
        """
        return f"{shlex.quote(str(CTL_SCRIPT))} {action} {shlex.quote(str(self.state_dir))}"

    def _ctl(self, action: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [str(CTL_SCRIPT), action, str(self.state_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if action != "status" and res.returncode != 0:
            raise RuntimeError(f"containerd_ctl.sh {action} failed: {res.stderr}{res.stdout}")
        return res

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> None:
        """Start containerd; with ``wait``, return once its socket answers.

        Answering the socket says nothing about the CRI plugin: use
        :meth:`wait_cri` for that.
        """
        if not self.config_path.exists():
            raise FileNotFoundError(f"{self.config_path}: call write_config() first")
        self._ctl("start")
        if wait:
            self.wait_socket(timeout)

    def stop(self) -> None:
        """Stop containerd (SIGTERM, then SIGKILL) and wait until it is gone."""
        try:
            self._ctl("stop")
        finally:
            self.kill_leftovers()

    def restart(self, *, wait: bool = True, timeout: float = 20.0) -> None:
        """Restart exactly as the product's ``--restart command:`` would."""
        self._ctl("restart")
        if wait:
            self.wait_socket(timeout)

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def node_pids(self) -> list[int]:
        """Live processes carrying this node's environment marker."""
        marker = f"{NODE_ENV_MARKER}={self.state_dir}".encode()
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

    @property
    def running(self) -> bool:
        return bool(self.node_pids())

    def kill_leftovers(self) -> None:
        """Last-resort SIGKILL of anything of this node (used at fixture teardown)."""
        for pid in self.node_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.node_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def wait_socket(self, timeout: float = 20.0) -> None:
        """Wait until ``ctr version`` answers on the socket; raise with the log tail if not."""
        deadline = time.monotonic() + timeout
        err = ""
        while time.monotonic() < deadline:
            res = self.ctr("version", timeout=5)
            if res.returncode == 0:
                return
            err = res.stderr.strip()
            if not self.running:
                raise RuntimeError(f"containerd of {self.name} exited: {err}\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"containerd of {self.name} not serving after {timeout}s: {err}\n{self.log_tail()}")

    # ---- health ------------------------------------------------------------
    def plugins(self) -> dict[tuple[str, str], str]:
        """{(type, id): status} from ``ctr plugins ls``; empty if the socket does not answer."""
        res = self.ctr("plugins", "ls", timeout=10)
        return _parse_plugins(res.stdout) if res.returncode == 0 else {}

    def wait_cri(self, timeout: float = 20.0) -> tuple[bool, str]:
        """Is the CRI plugin loaded?  Returns (ok, detail).

        containerd keeps serving when the CRI plugin fails, so the process
        being up proves nothing.  Plugins are loaded before the socket serves,
        so the first answer is final: ``(True, "ok")`` or ``(False, <ctr's
        error Message>)``, e.g. "invalid plugin config: `mirrors` cannot be set
        when `config_path` is provided".
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            status = self.plugins().get(("io.containerd.grpc.v1", "cri"))
            if status == "ok":
                return True, "ok"
            if status is not None:
                res = self.ctr("plugins", "ls", "-d", "id==cri", timeout=10)
                return False, _parse_plugin_error(res.stdout) if status == "error" else f"cri plugin {status}"
            if not self.running:
                return False, f"containerd not running; log tail:\n{self.log_tail()}"
            last = "socket not answering yet"
            time.sleep(0.1)
        return False, f"timeout after {timeout}s: {last}"

    # ---- logs --------------------------------------------------------------
    def log_text(self) -> str:
        """Everything containerd wrote, across restarts (each start adds a marker line)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- clients -----------------------------------------------------------
    def ctr(self, *args: str, namespace: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCK [-n NS] ARGS`` (never raises on a non-zero exit)."""
        cmd = [self.ctr_bin, "-a", str(self.socket)]
        if namespace:
            cmd += ["-n", namespace]
        try:
            return subprocess.run(
                cmd + list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
            )
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd + list(args), 124, _text(e.stdout), f"timeout: {e}")

    def ctr_pull(
        self, image: str, *, hosts_dir: Path | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Pull with ctr through hosts files (``--hosts-dir``, default: this node's certs.d).

        ctr resolves client-side and ignores the CRI registry settings in
        config.toml; use :meth:`crictl_pull` to test what the node really does.
        """
        return self.ctr(
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            str(hosts_dir or self.certs_dir),
            image,
            timeout=timeout,
        )

    def crictl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run crictl against this node's socket (the kubelet's view of the node)."""
        crictl = find_binary("crictl")
        if crictl is None:
            raise FileNotFoundError("crictl not found ($REGMIRROR_BIN_DIR, .cache/bin, PATH)")
        endpoint = f"unix://{self.socket}"
        cmd = [
            str(crictl),
            "--runtime-endpoint",
            endpoint,
            "--image-endpoint",
            endpoint,
            "--timeout",
            "10s",
            *args,
        ]
        # An empty config file keeps /etc/crictl.yaml and crictl.yaml beside the binary out of play.
        cfg = self.state_dir / "crictl.yaml"
        if not cfg.exists():
            cfg.write_text("")
        env = {**os.environ, "CRI_CONFIG_FILE": str(cfg)}
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
            )
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, 124, _text(e.stdout), f"timeout: {e}")

    def crictl_pull(self, image: str, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``crictl pull IMAGE``: a pull as the kubelet does it, honouring config.toml's registry table."""
        return self.crictl("pull", image, timeout=timeout)

    def images(self, namespace: str = "k8s.io") -> dict[str, str]:
        """{ref: manifest digest} of images in a namespace (k8s.io = pulled via CRI)."""
        res = self.ctr("images", "ls", namespace=namespace, timeout=10)
        out: dict[str, str] = {}
        for line in res.stdout.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3:
                out[cols[0]] = cols[2]
        return out

    def __repr__(self) -> str:
        return f"ContainerdNode({self.name!r}, root={self.node_root}, state={self.state_dir})"
