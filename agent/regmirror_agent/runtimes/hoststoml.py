"""containerd's ``hosts.toml`` (one per registry under ``config_path``), rendered and checked.

Rules from containerd's docs/hosts.md and RUNTIME-NOTES.md: ``server`` is the upstream, tried last; each
``[host."<url>"]`` is tried in file order. Hosts are written as real table headers, because containerd 2.x
orders hosts by table headers and silently drops inline or dotted host keys. Every file is parsed back with
a strict parser before it is used: containerd only logs a broken hosts.toml at pull time and then ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from urllib.parse import urlsplit

from regmirror_agent import credentials
from regmirror_api import models

#: Where containerd looks for a registry's directory: ``host:port`` as written, ``_default`` for any registry.
DEFAULT_DIR = "_default"


def registry_dir(registry: str) -> str:
    return DEFAULT_DIR if registry == models.ANY_REGISTRY else registry


def upstream_server(registry: str) -> str | None:
    """The upstream URL containerd falls back to; ``None`` for ``*`` (containerd then uses the image's host)."""
    if registry == models.ANY_REGISTRY:
        return None
    if registry == models.DOCKER_HUB:
        return "https://registry-1.docker.io"
    return f"https://{registry}"


@dataclasses.dataclass(frozen=True)
class TLS:
    """TLS settings of a host: ``ca`` paths are relative to the hosts.toml's directory or absolute."""

    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str | None], ...] = ()

    def merged_under(self, other: TLS) -> TLS:
        """These settings, with ``other`` filling in what these leave unset."""
        return TLS(self.skip_verify or other.skip_verify, self.ca or other.ca, self.client or other.client)


@dataclasses.dataclass(frozen=True)
class Host:
    url: str
    capabilities: tuple[str, ...] = models.DEFAULT_CAPABILITIES
    tls: TLS = TLS()
    override_path: bool = False
    authorization: str = dataclasses.field(default="", repr=False)
    """An ``Authorization`` header value sent to this host (``credentials``): a hosts.toml holding one is written
    mode 0600 and shown only redacted."""
    authorization_source: str = ""
    """Where the header comes from (``Secret regmirror-system/harbor``): the comment above it, and what the
    redacted view shows instead of the value."""


@dataclasses.dataclass(frozen=True)
class HostsFile:
    registry: str
    hosts: tuple[Host, ...]
    server_tls: TLS = TLS()
    origin: str = ""
    """Why the file exists, for its header comment (a RegistryMirror's name, or the inline config it replaces)."""
    server_host: Host | None = None
    """``upstream: Never``: this mirror is written as ``server`` (with its settings at the top level), so that
    containerd, which tries ``server`` last, has no upstream to fall back to. ``server_tls`` is then unused."""
    left_out: tuple[str, ...] = ()
    """Mirrors left out because they do not answer from this node (``mirrorhealth``), named in a comment."""

    def server(self) -> str | None:
        return self.server_host.url if self.server_host else upstream_server(self.registry)


def _q(text: str) -> str:
    """A TOML basic string. JSON escapes quotes, backslashes and control characters the way TOML does;
    other characters stay as they are (JSON's surrogate-pair escapes are not valid TOML)."""
    return json.dumps(text, ensure_ascii=False)


def _tls_lines(tls: TLS, indent: str) -> list[str]:
    lines = []
    if tls.skip_verify:
        lines.append(f"{indent}skip_verify = true")
    if len(tls.ca) == 1:
        lines.append(f"{indent}ca = {_q(tls.ca[0])}")
    elif tls.ca:
        lines.append(f"{indent}ca = [{', '.join(map(_q, tls.ca))}]")
    if tls.client:
        # Uniform [[cert, key]] pairs: an empty key makes containerd read the key from the cert file.
        pairs = ", ".join(f"[{_q(cert)}, {_q(key or '')}]" for cert, key in tls.client)
        lines.append(f"{indent}client = [{pairs}]")
    return lines


def render_hosts_toml(spec: HostsFile) -> str:
    lines = [
        f"# Written by regmirror for registry {_q(spec.registry)}{': ' + spec.origin if spec.origin else ''}.",
        "# regmirror puts this file back if it is edited; `regmirror reset` (or deleting the RegistryMirror)",
        "# gives the node its own configuration for this registry again.",
    ]
    if spec.left_out:
        lines.append(f"# Left out while they do not answer from this node: {', '.join(spec.left_out)}.")
    server = spec.server()
    if spec.server_host:
        lines.append("# upstream: Never: the last mirror is the server, so the upstream registry is never contacted.")
    if server:
        lines.append(f"server = {_q(server)}")
    if spec.server_host:
        lines.append(f"capabilities = [{', '.join(map(_q, spec.server_host.capabilities))}]")
        lines += _tls_lines(spec.server_host.tls, "")
        if spec.server_host.override_path:
            lines.append("override_path = true")
    else:
        lines += _tls_lines(spec.server_tls, "")
    if spec.server_host and spec.server_host.authorization:
        lines += ["", "[header]", *_header_lines(spec.server_host, "  ")]
    for host in spec.hosts:
        lines += ["", f"[host.{_q(host.url)}]", f"  capabilities = [{', '.join(map(_q, host.capabilities))}]"]
        lines += _tls_lines(host.tls, "  ")
        if host.override_path:
            lines.append("  override_path = true")
        if host.authorization:
            # Right after its own host's table: containerd 2.x orders hosts by table headers.
            lines += [f"[host.{_q(host.url)}.header]", *_header_lines(host, "  ")]
    text = "\n".join(lines) + "\n"
    check_hosts_toml(text, spec)
    return text


def _header_lines(host: Host, indent: str) -> list[str]:
    """The header table's body: the source comment (which ``credentials.redact`` reads back), then the value."""
    return [f"{indent}{credentials.SOURCE_COMMENT}{host.authorization_source or 'regmirror credentials'}",
            f"{indent}Authorization = [{_q(host.authorization)}]"]


def check_hosts_toml(text: str, spec: HostsFile) -> None:
    """Parse what was rendered and confirm containerd will see the same hosts in the same order."""
    parsed = tomllib.loads(text)
    hosts = parsed.get("host", {})
    if list(hosts) != [h.url for h in spec.hosts] or parsed.get("server") != spec.server():
        # Never the text itself in a message: it may carry an Authorization header.
        raise AssertionError(f"hosts.toml for {spec.registry!r} does not read back as rendered: hosts "
                             f"{list(hosts)}, server {parsed.get('server')!r}")


def _tls_from_table(table: object) -> TLS:
    """The TLS keys of a hosts.toml table (top level or one ``[host."<url>"]``), in every form containerd
    reads (containerd's remotes/docker/config/hosts.go): ``ca`` a path or a list; ``client`` a path, or a list
    whose items are a path (cert and key in one file) or a [cert, key] pair."""
    if not isinstance(table, dict):
        return TLS()
    ca_value = table.get("ca")
    ca = (ca_value,) if isinstance(ca_value, str) else tuple(c for c in ca_value or () if isinstance(c, str)) \
        if isinstance(ca_value, list) else ()
    client_value = table.get("client")
    items = [client_value] if isinstance(client_value, str) else client_value if isinstance(client_value, list) else []
    client: list[tuple[str, str | None]] = []
    for item in items:
        if isinstance(item, str):
            client.append((item, None))
        elif isinstance(item, list) and item and all(isinstance(x, str) for x in item):
            client.append((item[0], item[1] if len(item) > 1 and item[1] else None))
    return TLS(skip_verify=table.get("skip_verify") is True, ca=ca, client=tuple(client))


def parse_own_tls(text: str | None) -> tuple[TLS, dict[str, TLS]]:
    """A node's own hosts.toml's TLS settings: ``(for the upstream server, {mirror host:port: settings})``, so
    a file regmirror writes in its place keeps the private CA and client certificate they name. A file that
    does not parse has none that containerd would use either."""
    if not text:
        return TLS(), {}
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return TLS(), {}
    server = parsed.get("server")
    server_host = urlsplit(server).netloc if isinstance(server, str) else None
    server_tls = _tls_from_table(parsed)
    hosts: dict[str, TLS] = {}
    for url, table in (parsed.get("host") or {}).items() if isinstance(parsed.get("host"), dict) else ():
        tls = _tls_from_table(table)
        if tls == TLS():
            continue
        netloc = urlsplit(url).netloc
        if netloc == server_host:
            server_tls = server_tls.merged_under(tls) if server_tls != TLS() else tls
        else:
            hosts.setdefault(netloc, tls)
    return server_tls, hosts


def parse_hosts_toml(text: str) -> tuple[str | None, list[str]]:
    """``(server, [host urls in order])`` of an existing hosts.toml, for ``regmirror show``."""
    parsed = tomllib.loads(text)
    return parsed.get("server"), list(parsed.get("host", {}))
