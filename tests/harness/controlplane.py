"""A real etcd and kube-apiserver on loopback, for tests and by hand (the envtest pattern).

What a real apiserver proves that a mock cannot: the CRD's structural schema and CEL rules, the status
subresource, printer columns, server-side apply, watches and RBAC. Nothing else of a cluster runs: no
controller-manager (no garbage collector, no namespace finalization), no scheduler, no kubelet (Pods never
run; a DaemonSet is only an accepted object).

Binaries come from ``$KUBEBUILDER_ASSETS`` when it is set (controller-runtime's envtest convention), otherwise
from ``.cache/bin``, built once by ``hack/build-control-plane.sh``.

By hand::

    python -m tests.harness.controlplane      # prints `export KUBECONFIG=...`, runs until Ctrl-C

Everything lives in one temporary folder (certificates, the service-account key pair, etcd's data, logs and
the kubeconfig) that ``stop()`` removes. The admin is a static bearer token in group ``system:masters``;
``kubectl auth can-i --as=...`` impersonates other users from it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
CACHE_BIN = REPO / ".cache" / "bin"
BUILD_SCRIPT = REPO / "hack" / "build-control-plane.sh"
#: The range the apiserver allocates Service IPs from; its first address is the `kubernetes` Service.
SERVICE_CIDR = "10.0.0.0/24"


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, built, started or reached."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl command failed; ``str()`` shows the command and what kubectl said."""

    def __str__(self) -> str:
        return (f"kubectl {' '.join(self.cmd[3:])} exited {self.returncode}:\n"
                f"{(self.stderr or '').strip()}\n{(self.stdout or '').strip()}").rstrip()


@dataclasses.dataclass(frozen=True)
class Binaries:
    """Where the control plane's programs are."""

    etcd: Path
    kube_apiserver: Path
    #: None when neither the assets folder nor the cache holds one (the machine's kubectl may be too old).
    kubectl: Path | None


def find_binaries(*, build: bool = True) -> Binaries:
    """Locate etcd, kube-apiserver and kubectl; build them into ``.cache/bin`` if allowed and missing."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        folder = Path(assets)
        missing = [b for b in ("etcd", "kube-apiserver") if not _is_executable(folder / b)]
        if missing:
            raise ControlPlaneError(f"KUBEBUILDER_ASSETS={assets!r} holds no executable {', '.join(missing)}; "
                                    f"expected a folder with etcd and kube-apiserver (and optionally kubectl)")
        kubectl = folder / "kubectl" if _is_executable(folder / "kubectl") else _cached("kubectl")
        return Binaries(etcd=folder / "etcd", kube_apiserver=folder / "kube-apiserver", kubectl=kubectl)
    wanted = ("etcd", "kube-apiserver", "kubectl")
    if build and not all(_cached(b) for b in wanted):
        _build_binaries()
    missing = [b for b in ("etcd", "kube-apiserver") if not _cached(b)]
    if missing:
        raise ControlPlaneError(f"{CACHE_BIN} holds no {', '.join(missing)}; run {BUILD_SCRIPT} "
                                f"or point KUBEBUILDER_ASSETS at a folder that has them")
    return Binaries(etcd=CACHE_BIN / "etcd", kube_apiserver=CACHE_BIN / "kube-apiserver", kubectl=_cached("kubectl"))


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _cached(name: str) -> Path | None:
    path = CACHE_BIN / name
    return path if _is_executable(path) else None


def _build_binaries() -> None:
    # A lock, because two pytest processes (or a developer's shell) starting at once must not run two Go
    # builds of kube-apiserver side by side on a 2-core machine; the second waits and then finds the binaries.
    CACHE_BIN.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE_BIN.parent / "build-control-plane.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(_cached(b) for b in ("etcd", "kube-apiserver", "kubectl")):
            return
        print(f"[controlplane] building the control plane with {BUILD_SCRIPT} (several minutes the first time)",
              file=sys.stderr, flush=True)
        done = subprocess.run(["bash", str(BUILD_SCRIPT), str(CACHE_BIN)], cwd=REPO, check=False)
        if done.returncode != 0:
            raise ControlPlaneError(f"{BUILD_SCRIPT} exited {done.returncode}")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (a race remains; ``start`` retries once on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class _Pki:
    ca_pem: bytes
    serving_cert_pem: bytes
    serving_key_pem: bytes
    sa_public_pem: bytes
    sa_private_pem: bytes


def _generate_pki() -> _Pki:
    """A throw-away CA, a serving certificate for loopback, and the service-account signing key pair.

    P-256 keys: the apiserver accepts ECDSA for both, and they generate in microseconds where RSA takes a
    noticeable fraction of a second.
    """
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmirror-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    service_ip = next(ipaddress.IPv4Network(SERVICE_CIDR).hosts())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in (
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local")]
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(service_ip)]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    sa_key = ec.generate_private_key(ec.SECP256R1())

    def private_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    return _Pki(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        serving_cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        serving_key_pem=private_pem(key),
        sa_public_pem=sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo),
        sa_private_pem=private_pem(sa_key),
    )


class ControlPlane:
    """One etcd and one kube-apiserver, each on free loopback ports, sharing a temporary folder.

    Use as a context manager, or call ``start()`` and ``stop()``. After ``start()``: ``kubeconfig`` (a file
    for kubectl, the kubernetes client and kopf), ``server``, ``token`` (the admin's), ``ca_path``.
    """

    def __init__(self, *, binaries: Binaries | None = None, workdir: Path | None = None,
                 startup_timeout: float = 60.0, keep_workdir: bool = False,
                 extra_apiserver_args: Sequence[str] = (),
                 users: Mapping[str, Sequence[str]] | None = None) -> None:
        self._binaries = binaries
        #: Extra static-token users (name -> groups), e.g. ``system:node:a`` in ``system:nodes`` for a kubelet.
        self.users = dict(users or {})
        #: Their tokens, after ``start()``.
        self.user_tokens: dict[str, str] = {}
        self._workdir_arg = workdir
        self.startup_timeout = startup_timeout
        self.keep_workdir = keep_workdir
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.workdir: Path | None = None
        self.kubeconfig: Path | None = None
        self.ca_path: Path | None = None
        self.server = ""
        self.token = ""
        self.etcd_url = ""
        #: Seconds from ``start()`` until the apiserver was ready (binaries already present).
        self.startup_seconds = 0.0
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._made_workdir = False

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            self._binaries = find_binaries()
        return self._binaries

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Self:
        binaries = self.binaries
        t0 = time.monotonic()
        if self._workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="regmirror-controlplane-"))
            self._made_workdir = True
        else:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_credentials()
            # A free port can be taken between our probe and the server's bind; one retry covers that race.
            for attempt in (1, 2):
                try:
                    self._start_etcd(binaries)
                    self._start_apiserver(binaries)
                    self._write_kubeconfig()
                    self._wait_until_usable(deadline=t0 + self.startup_timeout)
                    break
                except _PortTaken:
                    self._stop_processes()
                    if attempt == 2:
                        raise ControlPlaneError("the control plane's ports were taken twice in a row") from None
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the apiserver, then etcd, and remove the folder (unless ``keep_workdir``). Safe to call twice."""
        self._stop_processes()
        if self.workdir and self._made_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- helpers for tests ---------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``KUBECONFIG``, for child processes (kopf, the agent, kubectl)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl as the admin; raise KubectlError on a non-zero exit when ``check``."""
        if self.binaries.kubectl is None:
            raise ControlPlaneError(f"no kubectl in {CACHE_BIN} or KUBEBUILDER_ASSETS; run {BUILD_SCRIPT}")
        cmd = [str(self.binaries.kubectl), "--kubeconfig", str(self.kubeconfig), *args]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                content_type: str = "application/json", *, token: str | None = None,
                accept: str = "application/json") -> tuple[int, Any]:
        """One raw HTTPS request, as the admin unless ``token`` is given; returns (status, JSON or text)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token or self.token}",
                                              "Content-Type": content_type, "Accept": accept})
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=10) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    # --- internals ------------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self.workdir is not None
        return self.workdir / name

    def _write_credentials(self) -> None:
        pki = _generate_pki()
        files = {"ca.crt": pki.ca_pem, "apiserver.crt": pki.serving_cert_pem, "apiserver.key": pki.serving_key_pem,
                 "sa.pub": pki.sa_public_pem, "sa.key": pki.sa_private_pem}
        for name, content in files.items():
            self._path(name).write_bytes(content)
            os.chmod(self._path(name), 0o600)
        self.ca_path = self._path("ca.crt")
        self.token = secrets.token_hex(24)
        # token,user,uid,"groups": system:masters bypasses RBAC, the way a cluster admin does.
        lines = [f'{self.token},admin,admin-uid,"system:masters"']
        for user, groups in self.users.items():
            self.user_tokens[user] = secrets.token_hex(24)
            lines.append(f'{self.user_tokens[user]},{user},{user}-uid,"{",".join(groups)}"')
        self._path("tokens.csv").write_text("\n".join(lines) + "\n")
        os.chmod(self._path("tokens.csv"), 0o600)

    def restart_etcd(self, down_seconds: float) -> None:
        """Stop etcd, leave the apiserver without it for ``down_seconds``, start it again on the same ports with
        the same data: a storage outage as the apiserver sees one."""
        proc = self._etcd
        assert proc is not None, "start() first"
        terminate(proc)
        time.sleep(down_seconds)
        self._start_etcd(self.binaries, ports=self._etcd_ports)
        self._wait_until_usable(deadline=time.monotonic() + self.startup_timeout)

    def _start_etcd(self, binaries: Binaries, ports: tuple[int, int] | None = None) -> None:
        client_port, peer_port = ports or (free_port(), free_port())
        self._etcd_ports = (client_port, peer_port)
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        data_dir = self._path("etcd")
        if ports is None:
            shutil.rmtree(data_dir, ignore_errors=True)
        self._etcd = self._spawn("etcd", [
            str(binaries.etcd), "--name=default", f"--data-dir={data_dir}",
            f"--listen-client-urls={self.etcd_url}", f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--initial-cluster-state=new",
            # A test cluster lives for minutes and is thrown away: durability buys nothing, fsync costs seconds.
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        deadline = time.monotonic() + 20
        while True:
            self._check_alive(self._etcd, "etcd")
            try:
                with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"etcd did not become healthy within 20 s\n{self._log_tail('etcd')}")
            time.sleep(0.1)

    def restart_apiserver(self, down_seconds: float) -> None:
        """Stop kube-apiserver, leave the cluster without it for ``down_seconds``, start it again on the same
        port (so every kubeconfig stays valid) and wait until it serves: an outage as clients see one."""
        proc = self._apiserver
        assert proc is not None, "start() first"
        terminate(proc)
        time.sleep(down_seconds)
        self._start_apiserver(self.binaries, port=int(self.server.rsplit(":", 1)[1]))
        self._wait_until_usable(deadline=time.monotonic() + self.startup_timeout)

    def _start_apiserver(self, binaries: Binaries, port: int | None = None) -> None:
        port = port or free_port()
        self.server = f"https://127.0.0.1:{port}"
        self._apiserver = self._spawn("kube-apiserver", [
            str(binaries.kube_apiserver),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            # The `kubernetes` Service's endpoints may not point at loopback, and no pod would use them anyway.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self._path('certs')}",
            f"--tls-cert-file={self._path('apiserver.crt')}", f"--tls-private-key-file={self._path('apiserver.key')}",
            f"--client-ca-file={self._path('ca.crt')}",
            f"--token-auth-file={self._path('tokens.csv')}",
            # A list flag that adds up: a caller's own --authorization-mode (e.g. Node,RBAC) replaces this one.
            *([] if any(a.startswith("--authorization-mode") for a in self.extra_apiserver_args)
              else ["--authorization-mode=RBAC"]),
            f"--service-account-key-file={self._path('sa.pub')}",
            f"--service-account-signing-key-file={self._path('sa.key')}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # The agent DaemonSet is privileged; without this the apiserver refuses its pod template.
            "--allow-privileged=true",
            "--profiling=false", "--v=1",
            *self.extra_apiserver_args,
        ])

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Run another component of the cluster (a controller-manager, a scheduler) with its log beside the
        apiserver's (``<workdir>/<name>.log``); the caller stops it."""
        return self._spawn(name, argv)

    def log_tail(self, name: str, lines: int = 40) -> str:
        return self._log_tail(name, lines)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self._path(f"{name}.log"), "wb")  # noqa: SIM115 - the child owns it from here
        try:
            # A session of its own: Ctrl-C in a terminal reaches only us, and we stop the children in order.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True,
                                    preexec_fn=die_with_parent())  # noqa: PLW1509 - set only from the main thread
        finally:
            log.close()

    def _check_alive(self, proc: subprocess.Popen[bytes] | None, name: str) -> None:
        if proc is not None and proc.poll() is not None:
            tail = self._log_tail(name)
            if "address already in use" in tail:
                raise _PortTaken(name)
            raise ControlPlaneError(f"{name} exited with {proc.returncode} while starting\n{tail}")

    def _log_tail(self, name: str, lines: int = 40) -> str:
        try:
            text = self._path(f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(f"  {name}| {line}" for line in text.splitlines()[-lines:])

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def _wait_until_usable(self, *, deadline: float) -> None:
        # /readyz covers etcd, the RBAC bootstrap roles and the built-in priority classes; the `default`
        # namespace is made by a post-start loop that /readyz does not wait for, and tests use it.
        last = ""
        while True:
            self._check_alive(self._etcd, "etcd")
            self._check_alive(self._apiserver, "kube-apiserver")
            try:
                status, body = self.request("GET", "/readyz")
                if status == 200:
                    status, body = self.request("GET", "/api/v1/namespaces/default")
                    if status == 200:
                        return
                last = f"{status} {str(body)[:300]}"
            except OSError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"kube-apiserver not ready within {self.startup_timeout:.0f} s "
                                        f"(last answer: {last})\n{self._log_tail('kube-apiserver')}")
            time.sleep(0.2)

    def write_kubeconfig(self, path: Path, *, token: str | None = None, user: str = "admin",
                         namespace: str = "default") -> Path:
        """A kubeconfig for this server with a bearer token (the admin's unless given), for example a
        service account's from ``kubectl create token``, to run a component with exactly its RBAC."""
        assert self.ca_path is not None
        ca_data = base64.b64encode(self.ca_path.read_bytes()).decode()
        # Inline CA data (not a path) so the file can be copied elsewhere; kubectl, the kubernetes client and
        # kopf's own kubeconfig reader all understand certificate-authority-data and a bearer token.
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "regmirror-test", "cluster": {
                "server": self.server, "certificate-authority-data": ca_data}}],
            "users": [{"name": user, "user": {"token": token or self.token}}],
            "contexts": [{"name": "regmirror-test", "context": {
                "cluster": "regmirror-test", "user": user, "namespace": namespace}}],
            "current-context": "regmirror-test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        os.chmod(path, 0o600)
        return path

    def _write_kubeconfig(self) -> None:
        self.kubeconfig = self.write_kubeconfig(self._path("kubeconfig"))

    def _stop_processes(self) -> None:
        # The apiserver first, so it never logs a storm of etcd connection errors on the way down.
        for attr in ("_apiserver", "_etcd"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            setattr(self, attr, None)


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 20 s: how an outage begins."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _PortTaken(ControlPlaneError):
    pass


def die_with_parent() -> Any:
    """A preexec_fn asking Linux to SIGKILL the child when its parent dies (a killed pytest leaves no etcd).

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only set from the main thread.
    """
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def set_pdeathsig() -> None:
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG

    return set_pdeathsig


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[ControlPlane]:
    """``with running() as cp:`` starts a control plane and always stops it."""
    cp = ControlPlane(**kwargs)
    with cp:
        yield cp


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.controlplane",
                                     description="Run a test etcd + kube-apiserver on loopback until Ctrl-C.")
    parser.add_argument("--workdir", type=Path, help="keep everything in this folder (kept after exit)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness (60)")
    args = parser.parse_args(argv)
    cp = ControlPlane(workdir=args.workdir, startup_timeout=args.timeout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with cp:
        kubectl = cp.binaries.kubectl or "kubectl"
        print(f"control plane ready in {cp.startup_seconds:.1f} s at {cp.server}", flush=True)
        print(f"kubeconfig: {cp.kubeconfig}")
        print(f"logs: {cp.workdir}/etcd.log {cp.workdir}/kube-apiserver.log")
        print(f"\nexport KUBECONFIG={cp.kubeconfig}")
        print(f"alias kubectl={kubectl}")
        print("\nPress Ctrl-C to stop.", flush=True)
        while not stop.wait(1):
            for proc, name in ((cp._apiserver, "kube-apiserver"), (cp._etcd, "etcd")):
                if proc is not None and proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; stopping\n{cp._log_tail(name)}", file=sys.stderr)
                    return 1
        print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
