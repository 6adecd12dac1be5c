"""One Kubernetes node on this machine: a real kubelet on its own real containerd, in a "host" of its own.

The node is a mount and PID namespace whose PID 1 is ``node_init.py`` (read it for why). Seen from the machine,
everything the node owns lives in one short folder (``dir``):

* ``etc/containerd/`` is the node's ``/etc/containerd`` (``config.toml``, ``certs.d``): what the agent edits;
* ``etc/docker/`` (empty) and ``etc/cni/net.d/`` are its ``/etc/docker`` and ``/etc/cni``;
* ``var/`` is its whole ``/var`` (containerd's root, the kubelet's root and Pod logs, ``/var/lib/regmirror``);
* ``opt/`` is its ``/opt`` (``/opt/cni/bin`` holds Debian's CNI plugins);
* ``logs/`` holds containerd's and the kubelet's output, ``events.jsonl`` every containerd start and stop.

Its ``/run`` is a tmpfs of its own (containerd's sockets): from the machine, ``/proc/<init>/root/run/...``.
A node on containerd 2.x has 2.x's ``containerd``, ``ctr`` and shim bound over ``/usr/bin``, so inside it
``containerd --version`` says 2.x, as on a real host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from tests.harness.containerd import CTR_BIN, flavor_dir
from tests.harness.controlplane import die_with_parent, free_port

HERE = Path(__file__).resolve().parent
NODE_INIT = HERE / "node_init.py"
CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
#: The pause image each containerd asks for by default; the harness tags its own sleeper under these names.
SANDBOX_IMAGES = {"1.6": "registry.k8s.io/pause:3.6", "2.x": "registry.k8s.io/pause:3.10.2"}

#: The seed's format (no ``version`` key, ``[plugins.cri]``) on containerd 1.6, with the paths a packaged
#: containerd uses. ``restrict_oom_score_adj`` is this sandbox's need, not the seed's (no CAP_SYS_RESOURCE).
CONFIG_SCHEMA1 = """\
# /etc/containerd/config.toml of a node on Debian's containerd 1.6 (schema 1, like the seed's)
root = "/var/lib/containerd"
state = "/run/containerd"
oom_score = 0

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins.cri]
    # This machine has no CAP_SYS_RESOURCE: without it runc fails every sandbox.
    restrict_oom_score_adj = true
    sandbox_image = "registry.k8s.io/pause:3.6"
    [plugins.cri.containerd]
      snapshotter = "overlayfs"
    [plugins.cri.cni]
      bin_dir = "/opt/cni/bin"
      conf_dir = "/etc/cni/net.d"
"""

#: containerd 2.x's own format (version 3), as its ``config default`` spells it.
CONFIG_V3 = """\
# /etc/containerd/config.toml of a node on containerd 2.x (version 3)
version = 3
root = '/var/lib/containerd'
state = '/run/containerd'

[grpc]
  address = '/run/containerd/containerd.sock'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

  [plugins.'io.containerd.cri.v1.runtime']
    # This machine has no CAP_SYS_RESOURCE: without it runc fails every sandbox.
    restrict_oom_score_adj = true
"""

#: A pod network once "the CNI is installed": point-to-point veths from Debian's plugins, nothing shared.
CNI_CONFLIST = {
    "cniVersion": "0.4.0",
    "name": "regmirror-test",
    "plugins": [{"type": "ptp", "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "SUBNET"}]]}}],
}


class NodeError(RuntimeError):
    """The node did not start, or a command in it failed."""


class KubeletNode:
    """A kubelet node. ``start()`` boots it (containerd, then the kubelet); ``stop()`` powers it off."""

    def __init__(self, name: str, *, flavor: str, server: str, ca_path: Path, token: str, kubelet: Path,
                 taints: Sequence[str] = (), subnet: str = "10.244.0.0/24", ip: str = "10.250.0.1") -> None:
        if flavor not in SANDBOX_IMAGES:
            raise ValueError(f"flavor is one of {', '.join(SANDBOX_IMAGES)}, not {flavor!r}")
        self.name = name
        self.flavor = flavor
        self.subnet = subnet
        #: The node's own address (the kubelet refuses a loopback one), put on ``lo`` while the node runs.
        self.ip = ip
        self.server, self.ca_path, self.token, self.kubelet = server, ca_path, token, kubelet
        self.taints = list(taints)
        # Short: the folder appears in unix socket paths.
        self.dir = Path(tempfile.mkdtemp(prefix=f"rmk-{name}-", dir="/tmp"))
        self.binaries = flavor_dir("2.x") if flavor == "2.x" else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.kubelet_port = 0
        self._layout()

    # --- paths as the machine sees them -------------------------------------------------------------------

    @property
    def etc_containerd(self) -> Path:
        return self.dir / "etc" / "containerd"

    @property
    def config_toml(self) -> Path:
        return self.etc_containerd / "config.toml"

    @property
    def state_dir(self) -> Path:
        """``/var/lib/regmirror`` of the node: the agent's rollback state."""
        return self.dir / "var" / "lib" / "regmirror"

    @property
    def events(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def socket(self) -> str:
        return f"/proc/{self.init_pid}/root/run/containerd/containerd.sock"

    def log(self, which: str) -> Path:
        return self.dir / "logs" / f"{which}.log"

    # --- lifecycle ----------------------------------------------------------------------------------------

    def _layout(self) -> None:
        d = self.dir
        for sub in ("etc/containerd", "etc/docker", "etc/cni/net.d", "var/lib", "var/log", "var/tmp",
                    "opt/cni/bin", "kubelet", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.symlink("/run", d / "var" / "run")
        self.config_toml.write_text(CONFIG_V3 if self.flavor == "2.x" else CONFIG_SCHEMA1)
        systemctl = d / "systemctl"
        systemctl.write_text(_SYSTEMCTL.format(python=sys.executable, control=d / "control.sock"))
        systemctl.chmod(0o755)

    def _binds(self) -> list[tuple[str, str]]:
        d = self.dir
        binds = [(str(d / "etc" / "containerd"), "/etc/containerd"), (str(d / "etc" / "docker"), "/etc/docker"),
                 (str(d / "etc" / "cni"), "/etc/cni"), (str(d / "var"), "/var"), (str(d / "opt"), "/opt"),
                 (str(CNI_PLUGINS), "/opt/cni/bin"), (str(d / "systemctl"), "/usr/bin/systemctl")]
        if self.binaries is not None:
            for b in ("containerd", "ctr", "containerd-shim-runc-v2"):
                binds.append((str(self.binaries / b), f"/usr/bin/{b}"))
        return binds

    def _write_kubelet_files(self) -> list[str]:
        self.kubelet_port = free_port()
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server,
                                                      "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": "kubelet", "user": {"token": self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "kubelet"}}],
            "current-context": "test",
        }
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # What this machine needs (REAL-COMPONENTS.md, "A real node").
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [], "failSwapOn": False, "localStorageCapacityIsolation": False,
            "evictionHard": {}, "imageGCHighThresholdPercent": 100,
            "address": self.ip, "port": self.kubelet_port, "healthzPort": free_port(), "readOnlyPort": 0,
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            # The apiserver asks the kubelet for `kubectl logs` over loopback with no client certificate.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "registerWithTaints": [{"key": t.split(":")[0].split("=")[0], "effect": t.split(":")[1]}
                                   for t in self.taints],
            "nodeStatusUpdateFrequency": "5s",
            "resolvConf": "/etc/resolv.conf",
        }
        (self.dir / "kubelet" / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        (self.dir / "kubelet" / "config.yaml").write_text(yaml.safe_dump(config))
        return [str(self.kubelet), f"--config={self.dir / 'kubelet' / 'config.yaml'}",
                f"--kubeconfig={self.dir / 'kubelet' / 'kubeconfig'}", f"--hostname-override={self.name}",
                f"--node-ip={self.ip}", "--v=1"]

    def start(self, timeout: float = 60.0) -> None:
        added = subprocess.run(["ip", "addr", "add", f"{self.ip}/32", "dev", "lo"], capture_output=True, text=True,
                               check=False)
        if added.returncode != 0 and "File exists" not in added.stderr:
            raise NodeError(f"cannot put {self.ip} on loopback for node {self.name}: {added.stderr.strip()}")
        containerd = str(self.binaries / "containerd") if self.binaries else "containerd"
        init = {
            "binds": self._binds(),
            "run_dirs": ["/run/containerd"],
            "control": str(self.dir / "control.sock"),
            "events": str(self.events),
            "ready": str(self.dir / "ready"),
            "services": {
                "containerd": {"argv": [containerd], "log": str(self.log("containerd")),
                               "ready_socket": "/run/containerd/containerd.sock"},
                "kubelet": {"argv": self._write_kubelet_files(), "log": str(self.log("kubelet"))},
            },
            "start": ["containerd"],
        }
        (self.dir / "init.json").write_text(json.dumps(init, indent=2))
        log = open(self.log("init"), "ab")  # noqa: SIM115 - the child owns it
        try:
            self._proc = subprocess.Popen(
                # --kill-child: the node's PID 1 dies with unshare, and with it everything in the node; unshare
                # itself dies with this process (a killed pytest leaves no node running).
                ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
                 str(NODE_INIT), str(self.dir / "init.json")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent())  # noqa: PLW1509 - set only from the main thread
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not (self.dir / "ready").exists():
            if self._proc.poll() is not None:
                raise NodeError(f"node {self.name} did not boot:\n{self.tail('init')}\n{self.tail('containerd')}")
            if time.monotonic() > deadline:
                raise NodeError(f"node {self.name} did not boot within {timeout:.0f} s:\n{self.tail('init')}")
            time.sleep(0.1)
        self.init_pid = _child_of(self._proc.pid)

    def start_kubelet(self) -> None:
        """Start the kubelet (after the images it needs are in containerd): the node registers."""
        self.systemctl("start", "kubelet")

    def stop(self) -> None:
        """Power the node off: the kubelet and containerd stop, every container in it dies with its PID 1."""
        proc = self._proc
        if proc is None:
            return
        if self.init_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self._proc = None
        subprocess.run(["ip", "addr", "del", f"{self.ip}/32", "dev", "lo"], capture_output=True, check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- inside the node ------------------------------------------------------------------------------------

    def systemctl(self, action: str, unit: str) -> str:
        """What ``systemctl ACTION UNIT`` says inside the node (the pid for start/restart)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(120)
            s.connect(str(self.dir / "control.sock"))
            s.sendall(f"{action} {unit}\n".encode())
            reply = s.makefile("r").readline().strip()
        if not reply.startswith("ok"):
            raise NodeError(f"systemctl {action} {unit} on {self.name}: {reply}")
        return reply.removeprefix("ok").strip()

    def run(self, *argv: str, timeout: float = 60, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """A command in the node's namespaces (its files, its containerd), as root on that host."""
        done = subprocess.run(["nsenter", "-t", str(self.init_pid), "-m", "-p", "--", *argv], input=input,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise NodeError(f"{' '.join(argv)} on {self.name} exited {done.returncode}: {done.stderr or done.stdout}")
        return done

    def ctr(self, *args: str, timeout: float = 300) -> str:
        """``ctr -n k8s.io ARGS`` against the node's containerd, with the node's own ctr."""
        ctr = str(self.binaries / "ctr") if self.binaries else CTR_BIN
        done = subprocess.run([ctr, "--address", self.socket, "-n", "k8s.io", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} on {self.name}: {done.stderr or done.stdout}")
        return done.stdout

    def import_image(self, tar: Path, *names: str) -> None:
        """Load an image archive into the node's containerd (as a node image's preload would); each of ``names``
        must then be there (the names the archive carries)."""
        self.ctr("images", "import", "--all-platforms", str(tar))
        present = set(self.ctr("images", "ls", "-q").split())
        missing = [n for n in names if n not in present]
        if missing:
            raise NodeError(f"{tar} gave {self.name} {sorted(present)}, not {missing}")

    def containerd_pid(self) -> int:
        """containerd's main pid, as the node sees it (changes with every restart)."""
        events = [json.loads(line) for line in self.events.read_text().splitlines()]
        last = [e for e in events if e["service"] == "containerd"][-1]
        return int(last["pid"]) if last["event"] == "started" else 0

    def containerd_starts(self) -> int:
        return sum(1 for line in self.events.read_text().splitlines()
                   if '"containerd"' in line and '"started"' in line)

    def install_cni(self) -> None:
        """What a CNI's DaemonSet does once its images are pulled: drop its network config on the node."""
        conflist = json.loads(json.dumps(CNI_CONFLIST).replace("SUBNET", self.subnet))
        (self.dir / "etc" / "cni" / "net.d" / "10-regmirror-test.conflist").write_text(json.dumps(conflist))

    def tail(self, which: str, lines: int = 30) -> str:
        try:
            text = self.log(which).read_text(errors="replace")
        except OSError:
            return f"({which}: no log)"
        return "\n".join(f"  {self.name}/{which}| {line}" for line in text.splitlines()[-lines:])


def _child_of(pid: int, timeout: float = 5.0) -> int:
    """The one child of ``unshare`` (the node's PID 1, as the machine numbers it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise NodeError(f"unshare ({pid}) has no child")


_SYSTEMCTL = '''#!{python}
"""systemctl of a regmirror test node: asks the node's PID 1 (node_init.py) to start, stop or restart a unit."""
import socket
import sys

words = [a for a in sys.argv[1:] if not a.startswith("-")]
if len(words) != 2:
    sys.exit("systemctl (regmirror test node): usage: systemctl start|stop|restart|is-active UNIT")
with socket.socket(socket.AF_UNIX) as s:
    s.connect("{control}")
    s.sendall((" ".join(words) + "\\n").encode())
    reply = s.makefile("r").readline().strip()
if not reply.startswith("ok"):
    sys.exit(reply.removeprefix("error ").strip())
if words[0] == "is-active":
    print("active")
'''
