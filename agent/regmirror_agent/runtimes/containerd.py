"""containerd: plan ``config.toml`` and ``hosts.toml`` files for the desired mirrors, for every config schema.

Where the registry settings live (RUNTIME-NOTES.md, containerd's docs/cri/config.md and docs/hosts.md):

- schema 1 (no ``version`` key): ``[plugins.cri.registry]``
- schema 2: ``[plugins."io.containerd.grpc.v1.cri".registry]``
- schema 3 and 4 (containerd 2.x): ``[plugins."io.containerd.cri.v1.images".registry]``

Two ways to mirror. *hosts* mode sets ``registry.config_path`` once and writes one ``hosts.toml`` per
registry; containerd reads those on every pull, so later changes need no restart. *inline* mode writes
``registry.mirrors."<registry>".endpoint`` into config.toml (containerd before 1.5 knows nothing else). The
CRI plugin refuses to load when inline ``mirrors`` or ``configs.<host>.tls`` sit beside ``config_path``, so
moving a node to hosts mode carries its own inline settings into hosts.toml files.

What regmirror owns in config.toml: in hosts mode the registry table's ``config_path``, ``mirrors`` and every
``configs.<host>.tls`` (it moves them all into hosts.toml files); in inline mode only what it writes, the
``mirrors."<registry>"`` of the registries it configures and the ``configs."<host>".tls`` of its mirror hosts
(``written_units``). Everything else is the node's, and tomlkit keeps it byte for byte.

containerd reads config.toml only at start: a change to it needs a restart; hosts.toml changes do not
(https://github.com/containerd/containerd/blob/main/docs/hosts.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import tomllib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import tomlkit
import tomlkit.container
import tomlkit.items

from regmirror_agent import credentials, mirrorhealth, ownership
from regmirror_agent.defaults import CONFIG_FILE, DEFAULT_STATE_DIR, MODES, STATE_FILE
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import Plan
from regmirror_agent.runtimes import Effective, RuntimeRefused, hoststoml
from regmirror_agent.runtimes.hoststoml import TLS, Host, HostsFile
from regmirror_api import models

RUNTIME = "containerd"
DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d"
#: Where inline mode keeps CA bundles it writes (inline settings name files by absolute path).
INLINE_CA_DIR = "/etc/containerd/regmirror-ca"

CRI_TABLES: Mapping[int, tuple[str, str]] = {
    1: ("plugins", "cri"),
    2: ("plugins", "io.containerd.grpc.v1.cri"),
    3: ("plugins", "io.containerd.cri.v1.images"),
    4: ("plugins", "io.containerd.cri.v1.images"),
}
#: Names under which ``disabled_plugins`` turns off what kubelet needs (Docker's containerd ships with "cri").
CRI_PLUGIN_NAMES = frozenset({"cri", "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images",
                              "io.containerd.cri.v1.runtime"})
MOVED_NOTE = ("moved the node's own inline registry mirrors/TLS settings into hosts.toml files: containerd "
              "refuses them beside config_path")


class NodeRefused(RuntimeRefused):
    """The node's own state makes the request unsafe or impossible; nothing is changed."""


@dataclasses.dataclass(frozen=True)
class Options:
    mode: str = "auto"
    config_file: str = CONFIG_FILE
    containerd_version: tuple[int, ...] | Callable[[], tuple[int, ...] | None] | None = None
    """The node's containerd version when known (or a probe, called only when the answer matters): picks
    inline mode before 1.5 and schema 3 for a new config.toml from 2.0."""

    def version(self) -> tuple[int, ...] | None:
        v = self.containerd_version
        return v() if callable(v) else v
    state_path: str = f"{DEFAULT_STATE_DIR}/{STATE_FILE}"
    left_out: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    """registry -> mirror URLs that do not answer from this node (``mirrorhealth``): hosts mode leaves them out
    of that registry's hosts.toml; inline mode would need a restart for it, so there they stay."""


# --- reading config.toml ------------------------------------------------------------------------------


def parse_config(text: str, path: str) -> tomlkit.TOMLDocument:
    """Parse strictly first (tomllib names the line), then with tomlkit, which keeps comments and layout."""
    try:
        check_types(tomllib.loads(text), path)
    except tomllib.TOMLDecodeError as exc:
        raise NodeRefused(f"{path} is not valid TOML: {exc}; fix it by hand first, regmirror changed nothing") \
            from exc
    return tomlkit.parse(text)


_TABLE, _TEXT, _FLAG, _TEXTS = "a table", "a string", "true or false", "a list of strings"
#: The keys regmirror reads or writes, with the type containerd gives them: checked before any of them is
#: used, so a file of the wrong shape is refused naming the key instead of failing halfway through a plan.
_REGISTRY_TYPES: Mapping[str, str] = {"config_path": _TEXT, "mirrors": _TABLE, "configs": _TABLE}
_MIRROR_TYPES: Mapping[str, str] = {"endpoint": _TEXTS}
_CONFIG_TYPES: Mapping[str, str] = {"tls": _TABLE}
_TLS_TYPES: Mapping[str, str] = {"ca_file": _TEXT, "cert_file": _TEXT, "key_file": _TEXT,
                                 "insecure_skip_verify": _FLAG}


def _type_problem(value: Any, expected: str) -> bool:
    if expected == _TABLE:
        return not isinstance(value, Mapping)
    if expected == _TEXT:
        return not isinstance(value, str)
    if expected == _FLAG:
        return not isinstance(value, bool)
    return not isinstance(value, list) or not all(isinstance(v, str) for v in value)


def check_types(doc: Mapping[str, Any], path: str) -> None:
    """Refuse a config.toml whose keys that regmirror uses have a type containerd would not accept either."""
    def check(table: Mapping[str, Any], where: tuple[str, ...], types: Mapping[str, str]) -> None:
        for key, expected in types.items():
            if key in table and _type_problem(table[key], expected):
                dotted = ".".join(json.dumps(k) if not k.replace("_", "").isalnum() else k for k in (*where, key))
                raise NodeRefused(f"{path}: {dotted} = {_plain(table[key])!r} should be {expected}; containerd "
                                  f"would not read it either. Fix it by hand first, regmirror changed nothing")

    check(doc, (), {"plugins": _TABLE, "grpc": _TABLE, "disabled_plugins": _TEXTS, "imports": _TEXTS})
    check(doc.get("grpc", {}), ("grpc",), {"address": _TEXT})
    plugins = doc.get("plugins", {})
    for _, name in sorted(set(CRI_TABLES.values())):
        check(plugins, ("plugins",), {name: _TABLE})
        check(plugins.get(name, {}), ("plugins", name), {"registry": _TABLE})
        registry = plugins.get(name, {}).get("registry", {})
        where = ("plugins", name, "registry")
        check(registry, where, _REGISTRY_TYPES)
        for host, entry in registry.get("mirrors", {}).items():
            check(registry["mirrors"], (*where, "mirrors"), {host: _TABLE})
            check(entry, (*where, "mirrors", host), _MIRROR_TYPES)
        for host, entry in registry.get("configs", {}).items():
            check(registry["configs"], (*where, "configs"), {host: _TABLE})
            check(entry, (*where, "configs", host), _CONFIG_TYPES)
            check(entry.get("tls", {}), (*where, "configs", host, "tls"), _TLS_TYPES)


def schema_version(doc: Mapping[str, Any], path: str) -> int:
    version = doc.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in CRI_TABLES:
        raise NodeRefused(f"{path}: version = {version!r} is not a containerd config schema regmirror knows "
                          f"(1, 2, 3 or 4)")
    return int(version)


def registry_table_path(version: int) -> tuple[str, ...]:
    return (*CRI_TABLES[version], "registry")


def _get(doc: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(doc, Mapping) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _plain(value: Any) -> Any:
    return value.unwrap() if hasattr(value, "unwrap") else value


def check_cri_enabled(doc: Mapping[str, Any], path: str) -> None:
    check_types(_plain(doc), path)
    disabled = set(_plain(doc.get("disabled_plugins", [])) or [])
    if disabled & CRI_PLUGIN_NAMES:
        raise NodeRefused(f"{path}: disabled_plugins = {sorted(disabled)} turns off containerd's CRI plugin "
                          f"(Docker's bundled containerd ships this way). kubelet cannot use this containerd, so "
                          f"its registry settings would do nothing; for a Docker node use --runtime docker")


def check_imports(doc: Mapping[str, Any], path: str, view: NodeView) -> None:
    """Refuse when a drop-in defines the CRI section: on 1.x it replaces config.toml's whole section."""
    imports = _plain(doc.get("imports", [])) or []
    for pattern in imports:
        if not isinstance(pattern, str):
            continue
        absolute = pattern if pattern.startswith("/") else posixpath.join(posixpath.dirname(path), pattern)
        for dropin in view.glob(absolute):
            text = view.read(dropin) or ""
            try:
                parsed = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise NodeRefused(f"{dropin} (imported by {path}) is not valid TOML: {exc}") from exc
            for plugin in {t[1] for t in CRI_TABLES.values()}:
                if _get(parsed, ("plugins", plugin)) is not None:
                    raise NodeRefused(
                        f"{dropin} (imported by {path}) defines [plugins.{plugin!r}]: containerd 1.x lets an "
                        f"imported file replace that whole section and 2.x merges it, so regmirror cannot "
                        f"safely edit the registry settings in {path}; move them into {path} first")


# --- building hosts.toml specs ------------------------------------------------------------------------


def _tls_from_config(tls: Mapping[str, Any] | None) -> TLS:
    if not tls:
        return TLS()
    client: tuple[tuple[str, str | None], ...] = ()
    if tls.get("cert_file"):
        client = ((str(tls["cert_file"]), str(tls.get("key_file") or "") or None),)
    return TLS(skip_verify=bool(tls.get("insecure_skip_verify", False)),
               ca=(str(tls["ca_file"]),) if tls.get("ca_file") else (), client=client)


def _endpoint_host(url: str) -> str:
    return urlsplit(url).netloc


def _legacy_registry(host: str) -> str:
    """Inline mirrors are keyed by what the image names; the Docker Hub aliases all mean docker.io there."""
    return models.DOCKER_HUB if host in models.DOCKER_HUB_ALIASES else host


def hosts_from_inline(mirrors: Mapping[str, Any], configs: Mapping[str, Any]) -> dict[str, HostsFile]:
    """Translate a node's own inline mirrors and TLS settings into hosts.toml specs that behave the same.

    Inline endpoints use their path verbatim when they have one, where hosts.toml appends ``/v2`` unless
    ``override_path`` is set; an endpoint equal to the upstream adds nothing (containerd tries it last anyway).
    """
    tls_by_host = {host: _tls_from_config(_plain(cfg).get("tls")) for host, cfg in configs.items()
                   if isinstance(_plain(cfg), Mapping) and _plain(cfg).get("tls")}
    specs: dict[str, HostsFile] = {}
    for host, entry in mirrors.items():
        registry = _legacy_registry(host)
        server = hoststoml.upstream_server(registry)
        hosts = []
        for raw_endpoint in _plain(entry).get("endpoint", []) or []:
            endpoint = str(raw_endpoint)
            if endpoint.rstrip("/") == server:
                continue
            path = urlsplit(endpoint).path
            hosts.append(Host(url=endpoint, tls=tls_by_host.get(_endpoint_host(endpoint), TLS()),
                              override_path=bool(path) and not path.rstrip("/").endswith("/v2")))
        specs[registry] = HostsFile(registry=registry, hosts=tuple(hosts), server_tls=tls_by_host.get(host, TLS()),
                                    origin="moved from config.toml's inline registry settings")
    for host, tls in tls_by_host.items():
        registry = _legacy_registry(host)
        if registry not in specs and models.check_registry(registry) == []:
            specs[registry] = HostsFile(registry=registry, hosts=(), server_tls=tls,
                                        origin="TLS settings moved from config.toml's inline registry settings")
    # containerd 1.6 and 1.7 before 1.7.32 reject a hosts.toml without any [host] table (#10027):
    # give those the upstream itself as the one host, with the same TLS settings.
    for registry, spec in specs.items():
        server = hoststoml.upstream_server(registry)
        if not spec.hosts and server:
            specs[registry] = dataclasses.replace(
                spec, hosts=(Host(url=server, capabilities=("pull", "resolve", "push"), tls=spec.server_tls),))
    return specs


def ca_file_name(pem: str) -> str:
    return f"regmirror-ca-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.crt"


def hosts_from_desired(mirror: models.RegistryMirror, node_tls: Mapping[str, TLS],
                       server_tls: TLS, out: frozenset[str] = frozenset()) -> tuple[HostsFile, dict[str, str]]:
    """A RegistryMirror as a hosts.toml spec plus the CA files it needs (name -> PEM, beside hosts.toml).

    ``out``: mirror URLs that do not answer from this node (``mirrorhealth``), left out of the file. When that
    leaves none, the upstream serves: it is written as an explicit ``[host]`` too, because containerd 1.6 and
    1.7 before 1.7.32 refuse a hosts.toml without any ``[host]`` table (containerd #10027). ``*`` has no one
    upstream to name, so there its mirrors are kept (containerd tries the image's own registry after them).
    ``upstream: Never`` makes the last kept mirror the ``server`` as well: containerd tries ``server`` last, and
    with a mirror there no request ever goes to the upstream registry."""
    kept = mirrorhealth.kept_mirrors(mirror, out)
    if not kept and mirror.registry == models.ANY_REGISTRY:
        kept = mirror.mirrors
    hosts = []
    ca_files: dict[str, str] = {}
    for m in kept:
        ca: tuple[str, ...] = ()
        if m.ca_bundle:
            name = ca_file_name(m.ca_bundle)
            ca_files[name] = m.ca_bundle if m.ca_bundle.endswith("\n") else m.ca_bundle + "\n"
            ca = (name,)
        tls = TLS(skip_verify=m.skip_verify, ca=ca).merged_under(node_tls.get(_endpoint_host(m.url), TLS()))
        authorization, source = _authorization(mirror, m)
        hosts.append(Host(url=m.url, capabilities=m.capabilities, tls=tls, override_path=m.override_path,
                          authorization=authorization, authorization_source=source))
    upstream = hoststoml.upstream_server(mirror.registry)
    if not hosts and upstream:
        hosts.append(Host(url=upstream, capabilities=models.DEFAULT_CAPABILITIES, tls=server_tls))
    never = mirror.upstream == models.UPSTREAM_NEVER
    origin = f"RegistryMirror {mirror.name!r}" + (f" generation {mirror.generation}" if mirror.generation else "")
    left_out = tuple(m.url for m in mirror.mirrors if m not in kept)
    return HostsFile(registry=mirror.registry, hosts=tuple(hosts), server_tls=server_tls, origin=origin,
                     server_host=hosts[-1] if never else None, left_out=left_out), ca_files


def _authorization(mirror: models.RegistryMirror, m: models.Mirror) -> tuple[str, str]:
    """``(header value, where from)`` for a mirror with credentials; they are resolved before planning
    (``credentials``), so a mirror whose credentials are still unresolved here is refused, never written bare."""
    if m.credentials is None:
        return "", ""
    if not m.credentials.authorization:
        raise NodeRefused(f"RegistryMirror {mirror.name!r}: the credentials of mirror {m.url!r} "
                          f"({m.credentials.where}) were not resolved on this node; nothing was changed")
    return m.credentials.authorization, m.credentials.where


# --- editing config.toml ------------------------------------------------------------------------------


def _ensure_table(doc: tomlkit.TOMLDocument, keys: Sequence[str]) -> Any:
    """The table at ``keys``, created (as implicit super tables where it can be) when missing."""
    node: Any = doc
    for i, key in enumerate(keys):
        if key not in node:
            if isinstance(node, tomlkit.items.InlineTable):  # TOML cannot put a [table] inside {...}
                raise NodeRefused(f"config.toml: {'.'.join(keys[:i])} is an inline table ({{...}}), where regmirror "
                                  f"would add the table {'.'.join(keys[:i + 1])}; write it as a [table] section "
                                  f"(regmirror does not restyle the node's own file); nothing was changed")
            node[key] = tomlkit.table(is_super_table=i < len(keys) - 1)
        node = node[key]
    return node


def _set_key(table: Any, key: str, value: Any) -> None:
    """Set a key; a new one is indented like the table's own keys, so a hand-formatted file stays readable."""
    new = key not in table
    table[key] = value
    item = table.item(key) if isinstance(table, tomlkit.items.Table) else None
    if new and isinstance(item, tomlkit.items.Item) and not isinstance(item, tomlkit.items.Table):
        item.trivia.indent = table.trivia.indent + ("  " if table.trivia.indent else "")


def _remove_if_empty(doc: tomlkit.TOMLDocument, keys: Sequence[str], keep: Mapping[str, Any] | None) -> None:
    """Drop tables regmirror added along ``keys`` once they hold nothing, deepest first."""
    for depth in range(len(keys), 0, -1):
        parent = _get(doc, keys[:depth - 1]) if depth > 1 else doc
        table = _get(doc, keys[:depth])
        if table is None or len(table) or _get(keep, keys[:depth]) is not None:
            return
        del parent[keys[depth - 1]]


def _same(a: Any, b: Any) -> bool:
    return bool(_plain(a) == _plain(b))


def _set_or_delete(table: Any, key: str, value: Any) -> None:
    if value is None:
        if key in table:
            del table[key]
    else:
        _set_key(table, key, value)


def same_data(_: str, a: str, b: str) -> bool:
    """Two TOML texts that mean the same to containerd (comments and layout aside)."""
    try:
        return tomllib.loads(a) == tomllib.loads(b)
    except tomllib.TOMLDecodeError:
        return False


Unit = tuple[str, ...]


def _units(reg: Any) -> set[Unit]:
    """The registry-table keys regmirror may write, relative to the table: ``config_path``, each
    ``mirrors."<registry>"`` and each ``configs."<host>".tls``."""
    if not isinstance(reg, Mapping):
        return set()
    mirrors = _get(reg, ("mirrors",))
    configs = _get(reg, ("configs",))
    units: set[Unit] = {("config_path",)} if "config_path" in reg else set()
    units |= {("mirrors", str(r)) for r in (mirrors if isinstance(mirrors, Mapping) else {})}
    units |= {("configs", str(h), "tls") for h, c in (configs.items() if isinstance(configs, Mapping) else ())
              if isinstance(c, Mapping) and "tls" in c}
    return units


def written_units(own_reg: Any, written: Sequence[str], keys: Sequence[str]) -> set[Unit] | None:
    """The registry-table keys regmirror answers for in a config.toml it wrote ``written`` into (the node's own
    registry table being ``own_reg``); ``None``: all of them (``config_path``, ``mirrors``, every
    ``configs.<host>.tls``).

    All of them when regmirror set ``config_path`` (hosts mode moves every inline mirror and TLS setting into
    hosts.toml files, because containerd refuses them beside it), or when what it wrote is unknown. In inline
    mode it owns only what it changed: the ``mirrors."<registry>"`` of the registries it configures and the
    ``configs."<host>".tls`` of its mirror hosts. The node's own entries for other registries and hosts stay
    the node's, so a hand edit to them survives apply and reset.
    """
    if not written:
        return None
    units: set[Unit] = set()
    for text in written:
        try:
            reg = _get(tomllib.loads(text), keys)
        except tomllib.TOMLDecodeError:
            return None
        if isinstance(reg, Mapping) and reg.get("config_path"):
            return None
        units |= {u for u in _units(reg) | _units(own_reg) if not _same(_get(reg, u), _get(own_reg, u))}
    return units


def undo_config(current: str | None, original: str | None, path: str, written: Sequence[str] = ()) -> str | None:
    """Give a hand-edited config.toml its node's own values for the keys regmirror owns; keep the rest.

    ``written``: what regmirror wrote into the file (the last apply, and one under way); it tells which keys
    regmirror owns (``written_units``). Unknown (empty): all of them.
    """
    if current is None:
        return original
    doc = parse_config(current, path)
    own = parse_config(original, path) if original is not None else tomlkit.document()
    keys = registry_table_path(schema_version(own if original is not None else doc, path))
    own_reg = _get(own, keys) or {}
    cur_reg = _get(doc, keys)
    owned = written_units(own_reg, written, keys)
    if owned is not None:  # inline mode: only the entries regmirror changed go back to the node's
        for unit in sorted(owned):
            want = _get(own_reg, unit)
            if not _same(_get(cur_reg, unit), want):
                _set_or_delete(_ensure_table(doc, (*keys, *unit[:-1])), unit[-1], want)
                _remove_if_empty(doc, (*keys, *unit[:-1]), own)
    else:
        for key in ("config_path", "mirrors"):
            if not _same(_get(cur_reg, (key,)), own_reg.get(key)):
                _set_or_delete(_ensure_table(doc, keys), key, own_reg.get(key))  # owned key back to the node's
        hosts = set(_get(cur_reg, ("configs",)) or {}) | set(own_reg.get("configs", {}) or {})
        for host in sorted(hosts):
            want = _get(own_reg, ("configs", host, "tls"))
            if not _same(_get(doc, (*keys, "configs", host, "tls")), want):
                _set_or_delete(_ensure_table(doc, (*keys, "configs", host)), "tls", want)
                _remove_if_empty(doc, (*keys, "configs", host), own)
    _remove_if_empty(doc, (*keys, "configs"), own)
    _remove_if_empty(doc, keys, own)
    undone = tomlkit.dumps(doc)
    if same_data(path, undone, current):
        return current  # nothing of regmirror's left to undo: keep every byte (tomlkit re-indents some tables)
    # Removing a table can leave a blank line behind; when only blank space differs from the node's own
    # file, give back its own bytes.
    if original is not None and _lines(undone) == _lines(original):
        return original
    return undone


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def minimal_config(version: int, config_path: str | None) -> tomlkit.TOMLDocument:
    """A config.toml for a node that had none: only what regmirror needs, so every other setting keeps
    containerd's built-in default."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("Created by regmirror: this node had no config.toml, so containerd ran on its "
                            "built-in defaults."))
    doc.add(tomlkit.comment("Every setting not written here keeps its default; `regmirror reset` removes "
                            "this file again."))
    doc["version"] = version
    table = _ensure_table(doc, registry_table_path(version))
    if config_path:
        _set_key(table, "config_path", config_path)
    return doc


def _take_inline(doc: tomlkit.TOMLDocument, keys: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Remove inline mirrors and configs.<host>.tls from the registry table; return them as plain dicts."""
    reg = _get(doc, keys)
    if reg is None:
        return {}, {}
    mirrors = dict(_plain(reg.get("mirrors", {})) or {})
    configs = dict(_plain(reg.get("configs", {})) or {})
    if "mirrors" in reg:
        table = reg["mirrors"]
        for host in list(table):
            del table[host]
    for host in list(configs):
        cfg = _get(reg, ("configs", host))
        if isinstance(cfg, MutableMapping) and "tls" in cfg:
            del cfg["tls"]
            if not len(cfg):
                del reg["configs"][host]
    return mirrors, configs


def choose_mode(requested: str, config_path: str, options: Options, path: str) -> str:
    def too_old() -> bool:
        version = options.version()
        return version is not None and tuple(version[:2]) < (1, 5)

    if requested == "inline":
        if config_path:
            raise NodeRefused(f"{path} sets config_path = {config_path!r}; containerd's CRI plugin refuses "
                              f"inline mirrors beside it (\"`mirrors` cannot be set when `config_path` is "
                              f"provided\"), so inline mode would break kubelet. Use --mode hosts")
        return "inline"
    if requested == "hosts":
        if not config_path and too_old():
            raise NodeRefused(f"containerd {'.'.join(map(str, options.version() or ()))} does not read "
                              f"hosts.toml (config_path needs 1.5 or later); use --mode inline")
        return "hosts"
    return "inline" if not config_path and too_old() else "hosts"


@dataclasses.dataclass
class _Desired:
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def _plan_hosts_mode(doc: tomlkit.TOMLDocument, keys: Sequence[str], desired: Sequence[models.RegistryMirror],
                     config_path: str, out: _Desired, options: Options,
                     own: Callable[[str], str | None] = lambda _: None) -> None:
    """``own(path)``: the node's own content of a file (before regmirror), to keep its hosts.toml TLS settings."""
    dirs = [d for d in config_path.split(":") if d]
    config_dir = dirs[0] if dirs else DEFAULT_CONFIG_PATH
    if not config_dir.startswith("/"):
        raise NodeRefused(f"config_path {config_dir!r} is not an absolute path")
    if len(dirs) > 1:
        version = options.version()
        if version is not None and tuple(version[:2]) >= (2, 1):
            # From 2.1 CRI pulls go through the transfer service, which takes the whole list as one directory
            # and so reads none of them (containerd #12415; seen on 2.3.7): only a single directory works.
            out.notes.append(f"config_path = {config_path!r} lists several directories, which containerd "
                             f"{'.'.join(map(str, version))} ignores for CRI pulls (containerd #12415); regmirror "
                             f"set it to {config_dir!r} alone (`regmirror reset` gives the list back)")
            config_path = ""
        else:
            out.notes.append(f"config_path = {config_path!r} lists several directories: regmirror writes into "
                             f"{config_dir!r}; on containerd 2.1 and later CRI pulls ignore a list like this "
                             f"(containerd #12415), so there the mirrors would not be used")
    if not config_path:
        _set_key(_ensure_table(doc, keys), "config_path", config_dir)
    mirrors, configs = _take_inline(doc, keys)
    if mirrors or any(isinstance(c, Mapping) and c.get("tls") for c in configs.values()):
        out.notes.append(MOVED_NOTE)
    specs = hosts_from_inline(mirrors, configs)
    node_tls = {host: _tls_from_config(cfg.get("tls")) for host, cfg in configs.items()
                if isinstance(cfg, Mapping) and cfg.get("tls")}
    for mirror in desired:
        inherited = specs.get(mirror.registry)
        # The node's own hosts.toml for this registry, which regmirror's replaces: its private CA and client
        # certificates still matter for the upstream fallback and for mirror hosts it names.
        own_server, own_hosts = hoststoml.parse_own_tls(
            own(posixpath.join(config_dir, hoststoml.registry_dir(mirror.registry), "hosts.toml")))
        server_tls = own_server.merged_under(inherited.server_tls) if inherited else own_server
        host_tls = {**node_tls, **{h: t.merged_under(node_tls.get(h, TLS())) for h, t in own_hosts.items()}}
        spec, ca_files = hosts_from_desired(mirror, host_tls, server_tls,
                                            options.left_out.get(mirror.registry, frozenset()))
        specs[mirror.registry] = spec
        for name, pem in ca_files.items():
            out.files[posixpath.join(config_dir, hoststoml.registry_dir(mirror.registry), name)] = pem
    for registry, spec in specs.items():
        out.files[posixpath.join(config_dir, hoststoml.registry_dir(registry), "hosts.toml")] = \
            hoststoml.render_hosts_toml(spec)


def _inline_endpoint(mirror: models.Mirror) -> str:
    """Inline endpoints use a non-empty path verbatim; hosts.toml would append /v2 unless override_path."""
    path = urlsplit(mirror.url).path
    if mirror.override_path or not path or path.rstrip("/").endswith("/v2"):
        return mirror.url
    return mirror.url.rstrip("/") + "/v2"


#: Who takes no mirror credentials (inline mode), and why: the planner's refusal and the driver's answer.
INLINE_NO_CREDENTIALS = ("containerd in inline mode",
                         "inline mode would put them in config.toml, which every user on the node can read, and "
                         "every rotation would restart containerd; use --mode hosts (containerd 1.5 or later), "
                         "where they go into the mirror's hosts.toml, readable by root only")


def _plan_inline_mode(doc: tomlkit.TOMLDocument, keys: Sequence[str], desired: Sequence[models.RegistryMirror],
                      out: _Desired, path: str) -> None:
    credentials.refuse(desired, INLINE_NO_CREDENTIALS, NodeRefused)
    tls_by_host: dict[str, dict[str, Any]] = {}
    for mirror in desired:
        if mirror.upstream == models.UPSTREAM_NEVER:
            # containerd's CRI plugin always appends the registry itself after inline endpoints.
            raise NodeRefused(f"RegistryMirror {mirror.name!r}: upstream: Never needs hosts mode (containerd 1.5 "
                              f"or later); inline mirrors always fall back to {mirror.registry!r} itself")
        for m in mirror.mirrors:
            if m.capabilities != models.DEFAULT_CAPABILITIES:
                raise NodeRefused(f"mirror {m.url!r}: inline mirrors always pull and resolve; capabilities "
                                  f"{list(m.capabilities)} need --mode hosts")
            tls: dict[str, Any] = {}
            if m.skip_verify:
                tls["insecure_skip_verify"] = True
            if m.ca_bundle:
                ca_path = posixpath.join(INLINE_CA_DIR, ca_file_name(m.ca_bundle))
                out.files[ca_path] = m.ca_bundle if m.ca_bundle.endswith("\n") else m.ca_bundle + "\n"
                tls["ca_file"] = ca_path
            host = _endpoint_host(m.url)
            if tls and tls_by_host.setdefault(host, tls) != tls:
                raise NodeRefused(f"mirror host {host!r} is given different TLS settings by two mirrors; inline "
                                  f"settings are per host, so use --mode hosts")
        endpoints = [_inline_endpoint(m) for m in mirror.mirrors]
        table = _ensure_table(doc, (*keys, "mirrors", mirror.registry))
        _set_key(table, "endpoint", endpoints)
    for host, tls in sorted(tls_by_host.items()):
        table = _ensure_table(doc, (*keys, "configs", host, "tls"))
        for key, value in tls.items():
            _set_key(table, key, value)


def plan_containerd(desired: Sequence[models.RegistryMirror], view: NodeView, state: ownership.State,
                    options: Options = Options()) -> Plan:
    """The whole desired containerd configuration of a node, as a Plan from its current files.

    An empty ``desired`` plans the node's own configuration back: that is what ``reset`` applies.
    """
    if options.mode not in MODES:
        raise ValueError(f"mode {options.mode!r}: expected one of {MODES}")
    models.check_unique_registries(desired)
    path = options.config_file

    def undo(p: str, current: str | None, original: str | None) -> str | None:
        if p != path:
            return original
        record = state.files.get(p)
        wrote = [t for t in ((record.written, *record.pending) if record else ()) if t is not None]
        return undo_config(current, original, p, wrote)

    current = view.read(path)
    def same(p: str, a: str, b: str) -> bool:  # only config.toml is regmirror's in part; the rest is whole
        return p == path and same_data(p, a, b)

    own_text = ownership.pristine(path, current, state, undo, same)
    out = _Desired()
    if desired:
        if own_text is None:
            known = options.version()
            version = 3 if known and known[0] >= 2 else 2
            doc = minimal_config(version, None)
        else:
            doc = parse_config(own_text, path)
            version = schema_version(doc, path)
            check_cri_enabled(doc, path)
            check_imports(doc, path, view)
        keys = registry_table_path(version)
        config_path = str(_get(doc, (*keys, "config_path")) or "")
        mode = choose_mode(options.mode, config_path, options, path)
        if mode == "hosts":
            _plan_hosts_mode(doc, keys, desired, config_path, out, options,
                             lambda p: ownership.pristine(p, view.read(p), state, undo, same))
        else:
            _plan_inline_mode(doc, keys, desired, out, path)
        new_text = tomlkit.dumps(doc)
        try:
            tomllib.loads(new_text)
        except tomllib.TOMLDecodeError as exc:  # a tomlkit bug must never reach a node
            raise NodeRefused(f"regmirror produced invalid TOML for {path} ({exc}); nothing was changed") from exc
        out.files[path] = new_text
    plan = ownership.plan_owned_files(runtime=RUNTIME, view=view, state=state, state_path=options.state_path,
                                      desired=out.files, restart_paths=frozenset({path}), undo=undo,
                                      notes=tuple(out.notes), same=same)
    if not plan.restart:  # the inline settings were moved by an earlier apply: nothing to tell now
        plan = dataclasses.replace(plan, notes=tuple(n for n in plan.notes if n != MOVED_NOTE))
    return plan


# --- what the node uses now (for `regmirror show`) ---------------------------------------------------


def describe(view: NodeView, path: str = CONFIG_FILE) -> tuple[str, list[Effective]]:
    """What containerd's CRI plugin will use per registry, read from the node's files."""
    text = view.read(path)
    if text is None:
        return f"{path}: absent (containerd's defaults: no mirrors)", []
    doc = parse_config(text, path)
    version = schema_version(doc, path)
    reg = _get(doc, registry_table_path(version)) or {}
    config_path = str(reg.get("config_path") or "")
    result: list[Effective] = []
    if config_path:
        config_dir = config_path.split(":", maxsplit=1)[0]
        for hosts_path in view.glob(posixpath.join(config_dir, "*", "hosts.toml")):
            name = posixpath.basename(posixpath.dirname(hosts_path))
            try:
                _, urls = hoststoml.parse_hosts_toml(view.read(hosts_path) or "")
            except tomllib.TOMLDecodeError as exc:
                result.append(Effective(name, (), f"{hosts_path}: INVALID, containerd ignores it ({exc})"))
                continue
            result.append(Effective("*" if name == hoststoml.DEFAULT_DIR else name, tuple(urls), hosts_path))
        header = f"{path}: schema {version}, hosts mode, config_path = {config_path!r}"
    else:
        for host, entry in (_plain(reg.get("mirrors")) or {}).items():
            result.append(Effective(host, tuple(entry.get("endpoint", [])), f"{path} (inline)"))
        header = f"{path}: schema {version}, inline mode"
    return header, sorted(result, key=lambda e: e.registry)

