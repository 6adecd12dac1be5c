"""A real OCI registry (Debian ``docker-registry`` 2.8) to play the mirror in tests.

Why a real registry: containerd speaks the distribution API with its own
quirks (``?ns=`` query, ``library/`` paths for Docker Hub, HEAD then GET,
token challenges).  A pull that succeeds through this process, on a machine
with no internet, can only have come through the mirror under test; its
access log then proves which paths were asked for.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

from tests.harness.oci import OciImage, build_oci_image

REGISTRY_BIN = os.environ.get("REGMIRROR_REGISTRY_BIN", "docker-registry")
SKOPEO_BIN = os.environ.get("REGMIRROR_SKOPEO_BIN", "skopeo")

# gorilla/handlers combined log format, written by the registry for every request:
#   127.0.0.1 - - [28/Nov/2026:13:08:09 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "Go-http-client/1.1"
_ACCESS_RE = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"'
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class AccessLogEntry:
    """One request the registry served."""

    method: str
    path: str  # includes the query string, e.g. "/v2/library/busybox/manifests/1.36?ns=docker.io"
    status: int
    user_agent: str  # e.g. "containerd/1.6.20~ds1" or "skopeo/1.9.3": who really asked


@dataclass(frozen=True)
class TlsMaterial:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, as PEM files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @property
    def ca_pem(self) -> str:
        return self.ca_cert.read_text()


def make_tls_material(dest: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsMaterial:
    """Generate a CA and a CA-signed server certificate whose SANs cover ``hosts``.

    Why a CA and not a self-signed leaf: containerd's hosts.toml ``ca =`` and
    the product's TLS handling are about trusting a private CA, which is what
    real mirrors use.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dest.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmirror test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    material = TlsMaterial(dest / "ca.crt", dest / "server.crt", dest / "server.key")
    material.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    material.server_cert.write_bytes(srv_cert.public_bytes(pem))
    material.server_key.write_bytes(
        srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    material.server_key.chmod(0o600)
    return material


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop a process group started with start_new_session; never raises."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


class Registry:
    """One ``docker-registry serve`` process on 127.0.0.1 with its own storage.

    ``Registry()`` starts immediately; use it as a context manager or call
    :meth:`stop`.  All output (including the per-request access log) goes to
    :attr:`log_path`, which :meth:`requests` parses.
    """

    def __init__(self, workdir: Path | None = None, *, tls: bool = False, start_timeout: float = 15.0,
                 users: dict[str, str] | None = None) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="regmirror-registry-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.layouts_dir = self.workdir / "layouts"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.tls: TlsMaterial | None = make_tls_material(self.workdir / "tls") if tls else None
        self.port = 0
        #: user -> password the registry demands (htpasswd auth), None for an open registry.
        self.users = dict(users) if users else None
        self.htpasswd_path = self.workdir / "htpasswd"
        self.pushed: dict[str, OciImage] = {}  # "repo:tag" -> digests, to check what a node got
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., Registry] | None = None
        self._start(start_timeout)

    # ---- addresses -------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (what goes into image references and skopeo)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:PORT`` (what goes into hosts.toml / mirror endpoints)."""
        return f"{self.scheme}://{self.host}"

    @property
    def ca_pem(self) -> str | None:
        """PEM of the CA that signed the server certificate (TLS registries only)."""
        return self.tls.ca_pem if self.tls else None

    @property
    def ca_path(self) -> Path | None:
        return self.tls.ca_cert if self.tls else None

    # ---- lifecycle -------------------------------------------------------
    def _write_config(self) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage_dir}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.tls:
            lines += [
                "  tls:",
                f"    certificate: {self.tls.server_cert}",
                f"    key: {self.tls.server_key}",
            ]
        if self.users is not None:
            self._write_htpasswd()
            lines += ["auth:", "  htpasswd:", "    realm: regmirror-test", f"    path: {self.htpasswd_path}"]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _write_htpasswd(self) -> None:
        """bcrypt entries, the only kind docker-registry's htpasswd auth accepts (``htpasswd -B``)."""
        import bcrypt

        assert self.users is not None
        self.htpasswd_path.write_text("".join(
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
            for user, password in sorted(self.users.items())))

    def set_users(self, users: dict[str, str], timeout: float = 15.0) -> None:
        """Change the logins the registry accepts (a rotation): docker-registry 2.8 reads its htpasswd file only
        at start, so it is restarted on the same port with the same storage."""
        self.users = dict(users)
        self.stop()
        self._start(timeout, port=self.port)

    @property
    def auth_header(self) -> dict[str, str]:
        """The Basic Authorization header of the first user, for the harness's own requests."""
        if not self.users:
            return {}
        import base64

        user, password = sorted(self.users.items())[0]
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def _start(self, timeout: float, port: int = 0) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # a port picked by free_port() can be taken before we bind it
            self.port = port or free_port()
            self._write_config()
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            # Safety net: kill the registry if the test process exits without stop().
            self._finalizer = weakref.finalize(self, _terminate, self._proc)
            ok, last_error = self._wait_ready(timeout)
            if ok:
                return
            self.stop()
            if "address already in use" not in last_error:
                break
        raise RuntimeError(f"docker-registry did not become ready: {last_error}")

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca_cert))

    def _wait_ready(self, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        err = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False, f"exited with {self._proc.returncode}: {self.log_text()[-2000:]}"
            try:
                request = urllib.request.Request(self.url + "/v2/", headers=self.auth_header)
                with urllib.request.urlopen(request, timeout=2, context=self._ssl_context()) as r:
                    if r.status == 200:
                        return True, ""
            except (urllib.error.URLError, OSError) as e:
                err = str(e)
            time.sleep(0.1)
        return False, f"timeout after {timeout}s: {err}; log: {self.log_text()[-2000:]}"

    def stop(self) -> None:
        """Stop the registry process (idempotent)."""
        if self._proc is not None:
            _terminate(self._proc)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def close(self) -> None:
        """Stop and delete the work dir if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ---- content ---------------------------------------------------------
    def push(self, repo: str, tag: str, content: str | None = None) -> OciImage:
        """Build a one-layer image whose /hello.txt holds ``content`` and push it as REPO:TAG.

        ``repo`` is the path inside this registry, e.g. ``k8scsi/csi-resizer``
        or ``library/busybox`` (what containerd asks a docker.io mirror for).
        """
        if content is None:
            content = f"{repo}:{tag}\n"
        layout = self.layouts_dir / re.sub(r"[^A-Za-z0-9._-]", "_", f"{repo}_{tag}")
        image = build_oci_image(layout, tag, content)
        cmd = [
            SKOPEO_BIN,
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:{tag}",
            f"docker://{self.host}/{repo}:{tag}",
        ]
        if self.users:
            cmd[4:4] = ["--dest-creds", ":".join(sorted(self.users.items())[0])]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"skopeo push failed ({res.returncode}): {res.stderr}\n{res.stdout}")
        self.pushed[f"{repo}:{tag}"] = image
        return image

    # ---- observation -----------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """Current end of the log; pass to ``since=`` to see only later requests.

        Why: the session-scoped registry is shared by many tests, so counts
        must be taken relative to the start of the step under test.
        """
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests(self, since: int = 0) -> list[AccessLogEntry]:
        """Every request in the access log (after byte offset ``since``)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        out: list[AccessLogEntry] = []
        for line in data.splitlines():
            m = _ACCESS_RE.search(line)
            if m and "level=" not in line:  # access lines only, not logrus app lines
                out.append(AccessLogEntry(m["method"], m["path"], int(m["status"]), m["agent"]))
        return out

    def requests_for(
        self,
        path_substring: str,
        *,
        since: int = 0,
        method: str | None = None,
        status: int | None = None,
        agent: str | None = None,
    ) -> int:
        """How many requests had ``path_substring`` in their path.

        ``method``/``status`` must match exactly; ``agent`` is a substring of
        the User-Agent (e.g. ``"containerd"`` to ignore skopeo's pushes).
        """
        return sum(
            1
            for r in self.requests(since)
            if path_substring in r.path
            and (method is None or r.method == method)
            and (status is None or r.status == status)
            and (agent is None or agent in r.user_agent)
        )
