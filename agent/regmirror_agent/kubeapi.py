"""A small Kubernetes API client for the agent: GET, merge and JSON PATCH and one streaming watch, nothing more.

Why not the ``kubernetes`` package: importing it alone costs the agent ~50 MiB of resident memory on every
node of the cluster, for the three calls it makes. This module uses the standard library's ``http.client``
and ``ssl`` and reads either the pod's service-account files or a kubeconfig (token or client certificate).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ApiError(Exception):
    """The apiserver answered with an error status, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"{status or 'unreachable'}: {message}")


@dataclasses.dataclass(frozen=True)
class Config:
    host: str
    port: int
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def bearer(self) -> str | None:
        if self.token_file:  # projected tokens rotate: read each time
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip()
        return self.token


def _materialize(data_b64: str | None, path: str | None, base: str) -> str | None:
    """kubeconfig fields come as a path or as base64 ``-data``; ssl wants paths."""
    if path:
        return path if os.path.isabs(path) else os.path.join(base, path)
    if not data_b64:
        return None
    fd, name = tempfile.mkstemp(prefix="regmirror-kube-")
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data_b64))
    return name


def load_config(kubeconfig: str | None = None) -> Config:
    """In a pod: the service account. Otherwise ``$KUBECONFIG`` (current context)."""
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return Config(host=os.environ["KUBERNETES_SERVICE_HOST"],
                      port=int(os.environ.get("KUBERNETES_SERVICE_PORT", "443")),
                      token_file=f"{SA_DIR}/token", ca_file=f"{SA_DIR}/ca.crt")
    if not kubeconfig:
        raise ApiError(0, "no cluster: set KUBECONFIG, or run in a pod with a service account")
    import yaml

    with open(kubeconfig, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    base = os.path.dirname(os.path.abspath(kubeconfig))
    ctx_name = doc.get("current-context")
    ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
    user: dict[str, Any] = next((u["user"] for u in doc.get("users", []) if u["name"] == ctx.get("user")), {}) or {}
    url = urlsplit(cluster["server"])
    return Config(
        host=url.hostname or "localhost", port=url.port or 443,
        token=user.get("token"), token_file=user.get("tokenFile"),
        ca_file=_materialize(cluster.get("certificate-authority-data"), cluster.get("certificate-authority"), base),
        cert_file=_materialize(user.get("client-certificate-data"), user.get("client-certificate"), base),
        key_file=_materialize(user.get("client-key-data"), user.get("client-key"), base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")))


#: Accept headers for metadata-only answers: a Node's labels without its status, for a list and for a watch.
METADATA_ONLY_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


class Client:
    """One kept-alive connection for requests (so a report costs no TLS handshake) and one per watch."""

    def __init__(self, config: Config, timeout: float = 30.0) -> None:
        self.config = config
        self.timeout = timeout
        ctx = ssl.create_default_context(cafile=config.ca_file)
        if config.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if config.cert_file:
            ctx.load_cert_chain(config.cert_file, config.key_file)
        self._ssl = ctx
        self._conn: http.client.HTTPSConnection | None = None
        self._lock = threading.Lock()  # the kept-alive connection serves one request at a time

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.config.host, self.config.port, context=self._ssl, timeout=timeout)

    def _headers(self, content_type: str | None = None, accept: str = "application/json") -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "regmirror-agent"}
        token = self.config.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: Any = None, *, params: Mapping[str, str] | None = None,
                content_type: str | None = None, accept: str = "application/json") -> Any:
        with self._lock:
            return self._request(method, path, body, params, content_type, accept)

    def _request(self, method: str, path: str, body: Any, params: Mapping[str, str] | None,
                 content_type: str | None, accept: str) -> Any:
        url = path + ("?" + urlencode(params) if params else "")
        payload = None if body is None else json.dumps(body).encode()
        headers = self._headers(content_type, accept)
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._conn or self._connection(self.timeout)
            self._conn = None
            try:
                conn.request(method, url, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                # A kept-alive connection the server closed while idle fails before any answer: once more, anew.
                if reused and attempt == 1:
                    continue
                raise ApiError(0, f"{method} {path}: {exc}") from exc
            if response.will_close:
                conn.close()
            else:
                self._conn = conn
            if response.status >= 400:
                raise ApiError(response.status, f"{method} {path}: {_reason(data)}")
            return json.loads(data) if data else None
        raise AssertionError("unreachable")

    def get(self, path: str, *, accept: str = "application/json", **params: str) -> Any:
        return self.request("GET", path, params=params or None, accept=accept)

    def create(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body, content_type="application/json")

    def merge_patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def json_patch(self, path: str, operations: Any) -> Any:
        return self.request("PATCH", path, operations, content_type="application/json-patch+json")

    def watch(self, path: str, params: Mapping[str, str], timeout_seconds: int, *, read_timeout: float,
              accept: str = "application/json") -> Iterator[dict[str, Any]]:
        """Stream watch events until the server closes the watch (after ``timeout_seconds``) or it fails.

        Bookmarks are asked for (they keep the resume point fresh where the resource changes). A dead connection
        is found by TCP keepalive within about two minutes; ``read_timeout`` only bounds a watch the server
        failed to end.
        """
        query = {**params, "watch": "true", "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true"}
        conn = self._connection(read_timeout)
        try:
            conn.connect()
            _keep_alive(conn.sock)
            conn.request("GET", f"{path}?{urlencode(query)}", headers=self._headers(accept=accept))
            response = conn.getresponse()
            if response.status >= 400:
                raise ApiError(response.status, f"watch {path}: {_reason(response.read())}")
            while True:
                line = response.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            raise ApiError(0, f"watch {path}: {exc}") from exc
        finally:
            conn.close()


#: TCP keepalive for watch connections: the first probe after 60 s of silence, then every 15 s, dead after 4.
KEEPALIVE = ((socket.TCP_KEEPIDLE, 60), (socket.TCP_KEEPINTVL, 15), (socket.TCP_KEEPCNT, 4))


def _keep_alive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _reason(data: bytes) -> str:
    try:
        return str(json.loads(data).get("message", data[:300]))
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")
