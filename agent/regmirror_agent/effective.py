"""What the running containerd really uses for CRI pulls, and whether that is what regmirror wrote.

"Configured" is not "used". The files regmirror writes can be out of force (containerd reads config.toml only
when it starts; a restart command that did nothing leaves the old process running) or ignored (containerd 2.1+
sends CRI pulls through its transfer service, which takes a ``config_path`` list as one directory: #12415,
#12636). This module judges from the runtime's own view, and stays pure: the I/O is in ``verifying``.

Where that view comes from differs by version (seen on 1.6.20 and 2.3.7; golden answers in
``tests/unit/golden/effective``):

- containerd 1.x answers CRI ``Status`` (``verbose``) with ``info["config"]``, the CRI plugin's configuration as the
  process holds it, ``registry.configPath`` and ``registry.mirrors`` included (what ``crictl info`` prints). That
  is exact: compared with config.toml as it is now, it says whether containerd still runs with older settings.
- containerd 2.x moved the registry into the images plugin, and its ``Status`` no longer carries it: ``crictl
  info`` shows no ``registry`` at all. What it does carry is the ``ContainerdHasNoDeprecationWarnings`` condition,
  whose message names ``io.containerd.deprecation/cri-registry-mirrors`` exactly when the running process has
  inline ``mirrors``. The rest is config.toml as the process read it at start, which it is when the file has not
  changed since the process started (``stale`` otherwise), with 2.x's own rules applied: an empty ``config_path``
  with no mirrors becomes the built-in ``/etc/containerd/certs.d:/etc/docker/certs.d`` on Linux
  (plugins/cri/images/plugin.go), and from 2.1 pulls use the transfer service unless something forces the
  older local path (``CheckLocalImagePullConfigs``: inline mirrors/configs/auths, ``use_local_image_pull``,
  ``disable_snapshot_annotations = false``, ``discard_unpacked_layers``).

Then, per registry, where containerd looks for its hosts: ``<dir>/<host_port_>``, ``<dir>/<host:port>``,
``<dir>/_default``, the first that exists (core/remotes/docker/config/hosts.go ``hostPaths``), for each
directory of ``config_path`` in turn, except on the transfer path, where the whole value is one directory.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from regmirror_agent.nodeviews import NodeView
from regmirror_agent.runtimes import containerd, hoststoml
from regmirror_api import models

#: 2.x's built-in ``config_path`` when config.toml sets none and has no inline mirrors (Linux).
BUILTIN_CONFIG_PATH_2X = "/etc/containerd/certs.d:/etc/docker/certs.d"
DEPRECATION_CONDITION = "ContainerdHasNoDeprecationWarnings"
DEPRECATED_MIRRORS = "io.containerd.deprecation/cri-registry-mirrors"
#: What containerd's resolver asks for when it resolves a tag (core/remotes/docker/resolver.go).
MANIFEST_ACCEPT = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "*/*",
))

# Reasons: one word each, for a condition's ``reason``; the message says the rest.
IN_USE = "InUse"
CANNOT_TELL = "CannotTell"
NOT_RESTARTED = "NotRestarted"
CONFIG_PATH_LIST = "ConfigPathListIgnored"
NO_CONFIG_PATH = "NoConfigPath"
OTHER_HOSTS = "OtherHosts"
BYPASSED = "Bypassed"
MIRROR_REFUSED = "MirrorRefused"
NOT_SERVED = "NotServed"


@dataclasses.dataclass(frozen=True)
class RegistrySettings:
    """The CRI registry settings that decide where a pull goes."""

    config_path: str = ""
    mirrors: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Inline ``registry.mirrors``: registry -> endpoints."""
    has_configs: bool = False
    """Inline ``registry.configs`` or ``auths`` (each forces 2.x's older local pull path)."""


@dataclasses.dataclass(frozen=True)
class RuntimeView:
    """What the running containerd uses for CRI pulls, and how sure we are of it."""

    version: tuple[int, ...] | None
    version_text: str
    registry: RegistrySettings
    source: str
    """``status``: containerd's own CRI Status said so (1.x); ``config.toml``: the file it read at start (2.x)."""
    transfer_service: bool = False
    """CRI pulls go through the transfer service (2.1+), which takes ``config_path`` as one directory."""
    builtin_config_path: bool = False
    """``config_path`` is 2.x's built-in list: config.toml sets none."""
    stale: str = ""
    """Why config.toml may not be what the process runs with ('' when it is); only for ``source == config.toml``."""

    def hosts_dirs(self) -> tuple[str, ...]:
        """The directories containerd searches for a registry's hosts, in order."""
        path = self.registry.config_path
        if not path:
            return ()
        if self.transfer_service:
            return (path,)
        return tuple(d for d in path.split(":") if d)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Does this node's runtime use the mirrors of one RegistryMirror? ``None``: it cannot be told."""

    in_use: bool | None
    reason: str
    message: str


# --- the runtime's own answer ----------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, ...] | None:
    """``1.6.20~ds1`` or ``v2.3.7`` (CRI ``Version.runtime_version``) as numbers."""
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text.strip())
    return tuple(int(x) for x in match.groups()) if match else None


def status_registry(info: Mapping[str, str]) -> RegistrySettings | None:
    """The registry settings in CRI ``Status`` ``info["config"]`` (1.x), or None when it carries none (2.x)."""
    try:
        config = json.loads(info.get("config") or "null")
    except ValueError:
        return None
    registry = config.get("registry") if isinstance(config, dict) else None
    if not isinstance(registry, dict):
        return None
    mirrors = {str(host): tuple(str(e) for e in (entry or {}).get("endpoint") or ())
               for host, entry in (registry.get("mirrors") or {}).items() if isinstance(entry, dict | type(None))}
    return RegistrySettings(config_path=str(registry.get("configPath") or ""), mirrors=mirrors,
                            has_configs=bool(registry.get("configs") or registry.get("auths")))


def deprecations(conditions: Sequence[tuple[str, bool, str]]) -> frozenset[str] | None:
    """The deprecation IDs the running 2.x process reports (``(type, status, message)`` conditions), or None
    when it reports no such condition (1.x)."""
    for kind, status, message in conditions:
        if kind != DEPRECATION_CONDITION:
            continue
        if status or not message:
            return frozenset()
        try:
            found = json.loads(message)
        except ValueError:
            return frozenset()
        return frozenset(map(str, found)) if isinstance(found, dict) else frozenset()
    return None


# --- config.toml, as containerd reads it ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileSettings:
    """The CRI image settings of config.toml as it is on disk now."""

    registry: RegistrySettings
    forces_local_pull: bool = False
    """Something other than inline registry settings that makes 2.x pull without the transfer service."""


def file_settings(text: str | None, path: str) -> FileSettings:
    """The registry table of config.toml (absent file: containerd's defaults). Raises ``containerd.NodeRefused``
    for a file containerd would not read either."""
    if text is None:
        return FileSettings(RegistrySettings())
    doc = containerd.parse_config(text, path).unwrap()
    version = containerd.schema_version(doc, path)
    table = _get(doc, containerd.CRI_TABLES[version]) or {}
    registry = table.get("registry") or {}
    mirrors = {str(host): tuple(map(str, (entry or {}).get("endpoint") or ()))
               for host, entry in (registry.get("mirrors") or {}).items()}
    local = (table.get("use_local_image_pull") is True or table.get("disable_snapshot_annotations") is False
             or table.get("discard_unpacked_layers") is True)
    return FileSettings(RegistrySettings(config_path=str(registry.get("config_path") or ""), mirrors=mirrors,
                                         has_configs=bool(registry.get("configs") or registry.get("auths"))),
                        forces_local_pull=local)


def _get(doc: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    return doc


def runtime_view(version_text: str, info: Mapping[str, str], conditions: Sequence[tuple[str, bool, str]],
                 on_disk: FileSettings, stale: str = "") -> RuntimeView:
    """The running containerd's effective registry settings, from its CRI answer and (2.x) config.toml.

    ``stale``: why config.toml may have changed since the process started ('' when it has not)."""
    version = parse_version(version_text)
    reported = status_registry(info)
    if reported is not None:
        return RuntimeView(version, version_text, reported, source="status",
                           transfer_service=_transfer(version, reported, on_disk.forces_local_pull))
    settings = on_disk.registry
    deprecated = deprecations(conditions)
    if (deprecated is not None and DEPRECATED_MIRRORS not in _ignored_deprecations(info)
            and (DEPRECATED_MIRRORS in deprecated) != bool(settings.mirrors)):
        # The process's own word beats the file: it has (or lacks) inline mirrors that config.toml does not.
        running = "has inline registry mirrors" if DEPRECATED_MIRRORS in deprecated else "has no inline mirrors"
        stale = stale or (f"the running containerd {running} (its ContainerdHasNoDeprecationWarnings condition "
                          f"says so), while config.toml {'sets some' if settings.mirrors else 'sets none'}")
    builtin = bool(version and version[0] >= 2 and not settings.config_path and not settings.mirrors)
    if builtin:
        settings = dataclasses.replace(settings, config_path=BUILTIN_CONFIG_PATH_2X)
    return RuntimeView(version, version_text, settings, source="config.toml", builtin_config_path=builtin,
                       transfer_service=_transfer(version, settings, on_disk.forces_local_pull), stale=stale)


def _ignored_deprecations(info: Mapping[str, str]) -> frozenset[str]:
    """The deprecation IDs the process was told not to report (``ignore_deprecation_warnings``, in its Status)."""
    try:
        config = json.loads(info.get("config") or "null")
    except ValueError:
        return frozenset()
    ignored = config.get("ignoreDeprecationWarnings") if isinstance(config, dict) else None
    return frozenset(map(str, ignored)) if isinstance(ignored, list) else frozenset()


def _transfer(version: tuple[int, ...] | None, registry: RegistrySettings, forces_local: bool) -> bool:
    return bool(version and tuple(version[:2]) >= (2, 1) and not registry.mirrors and not registry.has_configs
                and not forces_local)


# --- hosts as containerd finds them -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostEntry:
    """One host containerd tries for a registry, in order; the upstream (``server``) comes last."""

    url: str
    capabilities: tuple[str, ...]
    override_path: bool = False
    mirror: bool = True
    """False for the upstream registry itself (hosts.toml ``server``, or the image's own host)."""

    def base(self) -> str:
        """Where a registry API path goes: ``/v2`` appended unless the path ends in it or ``override_path``."""
        parts = urlsplit(self.url if "://" in self.url else f"https://{self.url}")  # containerd's default scheme
        path = parts.path.rstrip("/")
        if not self.override_path and not path.endswith("/v2"):
            path += "/v2"
        return f"{parts.scheme}://{parts.netloc}{path}"


@dataclasses.dataclass(frozen=True)
class Hosts:
    """The hosts containerd tries for one registry, and the file that says so (or why there is none)."""

    registry: str
    entries: tuple[HostEntry, ...]
    source: str
    problem: str = ""
    """Why containerd uses no mirror for the registry ('' when entries come from a file or inline mirrors)."""
    reason: str = ""
    """The problem in one word (``CONFIG_PATH_LIST``, ``NO_CONFIG_PATH``, ``OTHER_HOSTS``)."""

    def mirrors(self) -> list[str]:
        return [e.url for e in self.entries if e.mirror]


def candidate_dirs(registry: str) -> tuple[str, ...]:
    """Directory names containerd tries for ``registry``, in order (``hostPaths``)."""
    if registry == models.ANY_REGISTRY:
        return (hoststoml.DEFAULT_DIR,)
    names = []
    if ":" in registry:
        name, port = registry.rsplit(":", 1)
        names.append(f"{name}_{port}_")
    return (*names, registry, hoststoml.DEFAULT_DIR)


def _caps(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return tuple(value)
    return models.CAPABILITIES


def parse_hosts(registry: str, text: str, source: str) -> Hosts:
    """The hosts of one hosts.toml, in the order containerd tries them (the ``server`` last)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Hosts(registry, _upstream_only(registry), source,
                     f"{source} is not valid TOML, so containerd ignores it and pulls from the upstream ({exc})",
                     OTHER_HOSTS)
    entries = []
    for url, raw in (doc.get("host") or {}).items() if isinstance(doc.get("host"), dict) else ():
        table = raw if isinstance(raw, dict) else {}
        entries.append(HostEntry(str(url), _caps(table.get("capabilities")), table.get("override_path") is True))
    server = doc.get("server")
    upstream = hoststoml.upstream_server(registry)
    if isinstance(server, str) and server:
        is_upstream = upstream is not None and server.rstrip("/") == upstream.rstrip("/")
        entries.append(HostEntry(server, _caps(doc.get("capabilities")), doc.get("override_path") is True,
                                 mirror=not is_upstream))
    elif upstream:
        entries.append(HostEntry(upstream, models.CAPABILITIES, mirror=False))
    return Hosts(registry, tuple(entries), source)


def _upstream_only(registry: str) -> tuple[HostEntry, ...]:
    upstream = hoststoml.upstream_server(registry)
    return (HostEntry(upstream, models.CAPABILITIES, mirror=False),) if upstream else ()


def find_hosts(view: RuntimeView, registry: str, node: NodeView) -> Hosts:
    """The hosts the running containerd tries for ``registry``: its inline mirrors, or the hosts.toml it finds."""
    settings = view.registry
    if settings.mirrors or not settings.config_path:
        endpoints = settings.mirrors.get(registry, ())
        entries = [HostEntry(e, ("pull", "resolve"), override_path=bool(urlsplit(e).path.strip("/")))
                   for e in endpoints]
        problem = "" if entries else (
            f"containerd runs with inline registry mirrors for {', '.join(sorted(settings.mirrors))} and none for "
            f"{registry}" if settings.mirrors else
            "containerd runs without config_path and without inline mirrors, so it reads no hosts.toml and pulls "
            "from the upstream registry")
        reason = "" if entries else OTHER_HOSTS if settings.mirrors else NO_CONFIG_PATH
        return Hosts(registry, (*entries, *_upstream_only(registry)), "inline registry.mirrors", problem, reason)
    dirs = view.hosts_dirs()
    if view.transfer_service and ":" in settings.config_path:
        origin = "its built-in config_path" if view.builtin_config_path else f"config_path = {settings.config_path!r}"
        return Hosts(registry, _upstream_only(registry), settings.config_path, (
            f"containerd {view.version_text} ignores {origin} for CRI pulls: from 2.1 they go through the transfer "
            f"service, which takes the whole list as one directory and finds no {registry} in it (containerd "
            f"#12415); config_path must name one directory ({settings.config_path.split(':')[0]})"),
                     CONFIG_PATH_LIST)
    for root in dirs:
        for name in candidate_dirs(registry):
            folder = posixpath.join(root, name)
            if node.is_dir(folder):
                path = posixpath.join(folder, "hosts.toml")
                text = node.read(path)
                if text is None:
                    return Hosts(registry, _upstream_only(registry), folder,
                                 f"containerd uses {folder} for {registry}, which holds no hosts.toml", OTHER_HOSTS)
                return parse_hosts(registry, text, path)
    where = " or ".join(posixpath.join(d, n) for d in dirs[:1] for n in candidate_dirs(registry))
    return Hosts(registry, _upstream_only(registry), settings.config_path,
                 f"containerd finds no hosts directory for {registry} ({where}), so it pulls from the upstream",
                 OTHER_HOSTS)


# --- the verdict ----------------------------------------------------------------------------------------


def _norm(url: str) -> str:
    return url.rstrip("/").removesuffix("/v2").rstrip("/")


def judge(view: RuntimeView | None, why_not: str, on_disk: FileSettings, mirror: models.RegistryMirror,
          node: NodeView, left_out: frozenset[str] = frozenset()) -> Verdict:
    """Does the running containerd use ``mirror``'s mirrors (those not ``left_out``) for CRI pulls?

    ``view`` None: containerd did not answer; ``why_not`` says why."""
    if view is None:
        return Verdict(None, CANNOT_TELL, f"cannot tell whether containerd uses the mirrors: {why_not}")
    reg = mirror.registry
    if view.source == "status" and view.registry != on_disk.registry:
        return Verdict(False, NOT_RESTARTED, _not_restarted(view.registry, on_disk.registry, reg))
    if view.stale:
        return Verdict(False, NOT_RESTARTED, f"containerd still runs with the configuration it read before "
                                             f"config.toml last changed ({view.stale}): restart containerd")
    expected = [m.url for m in mirror.mirrors if m.url not in left_out]
    if not expected:
        return Verdict(False, OTHER_HOSTS, "every mirror is left out on this node (none answers), so pulls go to "
                                           "the upstream registry")
    hosts = find_hosts(view, reg, node)
    if hosts.problem:
        return Verdict(False, hosts.reason or OTHER_HOSTS, hosts.problem)
    tried = [_norm(u) for u in hosts.mirrors()]
    if [u for u in tried if u in {_norm(e) for e in expected}] != [_norm(e) for e in expected]:
        return Verdict(False, OTHER_HOSTS, f"containerd tries {', '.join(hosts.mirrors()) or 'no mirror'} for "
                                           f"{reg} (from {hosts.source}), not {', '.join(expected)}")
    return Verdict(True, IN_USE, f"containerd {view.version_text} tries {', '.join(expected)} for {reg} "
                                 f"(from {hosts.source})")


def _not_restarted(running: RegistrySettings, on_disk: RegistrySettings, registry: str) -> str:
    if running.config_path != on_disk.config_path:
        return (f"containerd still runs with config_path = {running.config_path!r}, while config.toml now says "
                f"{on_disk.config_path!r}: it reads config.toml only when it starts, so restart containerd")
    if running.mirrors.get(registry) != on_disk.mirrors.get(registry):
        return (f"containerd still runs with registry.mirrors {list(running.mirrors.get(registry, ()))} for "
                f"{registry} from before, while config.toml now says {list(on_disk.mirrors.get(registry, ()))}: "
                f"it reads config.toml only when it starts, so restart containerd")
    return ("containerd still runs with other registry settings (mirrors or configs) than config.toml now holds: "
            "it reads config.toml only when it starts, so restart containerd")


# --- resolving an image as containerd would ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    reference: str
    """A tag, or a digest (``sha256:...``)."""

    @property
    def is_digest(self) -> bool:
        return ":" in self.reference


def parse_image(image: str, registry: str) -> ImageRef:
    """``quay.io/x/y:1``, ``docker.io/busybox:1.36`` or ``host:5000/x@sha256:...`` (checked by the model).
    Docker Hub's one-part names get ``library/``; ``registry`` (the RegistryMirror's) decides for ``*``."""
    rest, _, digest = image.partition("@")
    host, _, path = rest.partition("/")
    name, colon, tag = path.rpartition(":") if ":" in path.rsplit("/", 1)[-1] else (path, "", "")
    if not colon:
        name, tag = path, "latest"
    if host in models.DOCKER_HUB_ALIASES:
        host = models.DOCKER_HUB
    if host == models.DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    return ImageRef(host if registry == models.ANY_REGISTRY else registry, name, digest or tag)


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One request containerd would send to resolve an image, to one host."""

    url: str
    host: str
    mirror: bool


def plan_resolve(image: ImageRef, hosts: Hosts) -> list[Attempt]:
    """The ``HEAD .../manifests/<ref>`` requests containerd would send, in order: hosts with ``resolve`` (a tag)
    or ``pull`` (a digest), mirrors with ``?ns=<registry>``, the upstream last."""
    need = {"pull"} if image.is_digest else {"pull", "resolve"}
    attempts = []
    for entry in hosts.entries:
        if not need <= set(entry.capabilities):
            continue
        url = f"{entry.base()}/{quote(image.repository)}/manifests/{quote(image.reference, safe=':')}"
        if entry.mirror:
            url += f"?ns={quote(image.registry, safe='')}"
        attempts.append(Attempt(url, entry.url, entry.mirror))
    return attempts


def judge_answers(image: str, answers: Sequence[tuple[Attempt, int | None, str]]) -> Verdict:
    """What the answers to ``plan_resolve``'s requests mean, in order: ``(attempt, HTTP status or None, error)``.
    containerd moves to the next host on a connection error and on any status of 400 or more; the first host
    that answers 2xx serves the image."""
    said: list[str] = []
    for attempt, status, error in answers:
        who = f"{'mirror' if attempt.mirror else 'upstream'} {attempt.host}"
        if status is not None and 200 <= status < 300:
            if attempt.mirror:
                return Verdict(True, IN_USE, f"{image} resolves through the {who} (HTTP {status})"
                                             + (f" after {'; '.join(said)}" if said else ""))
            return Verdict(False, BYPASSED, f"{image} resolves from the {who} (HTTP {status}), past the "
                                            f"mirrors: {'; '.join(said) or 'none is tried'}")
        if status == 401 and not attempt.mirror:
            return Verdict(False, BYPASSED, f"{image} goes to the {who} (HTTP 401: containerd would authenticate "
                                            f"there), past the mirrors: {'; '.join(said) or 'none is tried'}")
        if status == 401 and attempt.mirror:
            return Verdict(None, MIRROR_REFUSED, f"the {who} asks for credentials (HTTP 401) for {image}: "
                                                 f"containerd would authenticate; regmirror cannot tell whether "
                                                 f"the pull is served")
        said.append(f"the {who} answered HTTP {status}" if status is not None else f"the {who} failed ({error})")
    return Verdict(False, NOT_SERVED if said else OTHER_HOSTS,
                   f"no host serves {image}: {'; '.join(said)}" if said else f"no host would resolve {image}")
