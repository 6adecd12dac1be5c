"""CRI-O: mirrors as regmirror's own drop-in ``/etc/containers/registries.conf.d/50-regmirror.conf``.

CRI-O pulls with the containers/image library, which reads ``/etc/containers/registries.conf`` and then every
``*.conf`` in ``registries.conf.d`` in name order; an entry whose ``prefix`` an earlier file had replaces it
whole (containers-registries.conf.d(5)). So regmirror writes one file of its own in the v2 format
(containers-registries.conf(5)) and never edits the node's registries.conf: reset removes the drop-in, and the
node's files are what they were byte for byte. CRI-O re-reads registries on SIGHUP (``systemctl reload crio``),
so no restart and no stopped container; an invalid file makes it keep the old configuration, which is why every
file is parsed back here before it is written.

What a RegistryMirror says, in registries.conf words, and what it cannot say (refused by name, nothing written):

- ``registry`` is the entry's ``prefix``; its mirrors are ``[[registry.mirror]]`` tables tried in order, then
  ``location`` (the registry itself). ``*`` cannot be said: a prefix names one registry (or ``*.domain``
  subdomains), there is no catch-all entry.
- A mirror URL becomes a ``location``, ``host[:port][/namespace]``: containers/image always asks
  ``host/v2/<namespace>/<repository>``. So a URL without a path (or ending in ``/v2``) is the host; a
  path-rooted mirror (Harbor's proxy project) is ``https://host/v2/project`` with ``overridePath``, as containerd
  takes it, and becomes ``host/project``. A path before ``/v2`` (containerd's ``https://host/path`` without
  ``overridePath``) has no equivalent.
- ``insecure = true`` is both "plain HTTP allowed" and "do not verify TLS" for that location. So an ``http://``
  mirror, and an ``https://`` one with ``skipVerify``, get it; nothing else does.
- ``caBundle`` becomes ``/etc/containers/certs.d/<host[:port]>/regmirror.crt``: containers/image adds every
  ``*.crt`` of the mirror host's certs.d folder to the trusted CAs (containers-certs.d(5)). Two mirrors on one
  host with different bundles cannot both be in that folder, and are refused.
- ``upstream: Never``: registries.conf has no "never contact the location", and ``blocked = true`` blocks the
  mirrors as well. But the location itself may be rewritten: the last mirror becomes the ``location`` and the
  others its mirrors, so the pull tries the same URLs in the same order and the registry is never contacted.
- ``capabilities`` other than pull and resolve: containers/image mirrors always serve both tag and digest pulls
  (``pull-from-mirror = all``); ``digest-only`` skips the mirror for tag pulls, which no capability list means.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import tomllib
from collections.abc import Sequence
from urllib.parse import urlsplit

from regmirror_agent import credentials, ownership
from regmirror_agent.defaults import DEFAULT_STATE_DIR, STATE_FILE
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import Plan
from regmirror_agent.runtimes import Effective, RuntimeRefused
from regmirror_api import models

RUNTIME = "crio"
CRIO_DIR = "/etc/crio"
REGISTRIES_CONF = "/etc/containers/registries.conf"
DROP_IN_DIR = "/etc/containers/registries.conf.d"
#: Before a node's own ``99-*`` drop-ins, which then still win (see ``check_not_replaced``).
DROP_IN = f"{DROP_IN_DIR}/50-regmirror.conf"
CERTS_D = "/etc/containers/certs.d"
CA_FILE = "regmirror.crt"
HEADER = ("# Written by regmirror: registry mirrors for CRI-O (containers-registries.conf(5), version 2).\n"
          "# regmirror owns this file and removes it on reset; the node's own registries.conf is not touched.\n")


#: Who takes no mirror credentials from regmirror, and why: the planner's refusal and the driver's answer.
NO_CREDENTIALS = ("CRI-O",
                  "containers-registries.conf(5) has no credentials field; CRI-O reads them only from its auth "
                  "file (containers-auth.json(5), --global-auth-file), which regmirror does not write")


class CrioRefused(RuntimeRefused):
    """CRI-O cannot do what was asked, or a node file in the way cannot be read; nothing is changed."""


@dataclasses.dataclass(frozen=True)
class Options:
    drop_in: str = DROP_IN
    state_path: str = f"{DEFAULT_STATE_DIR}/{STATE_FILE}"


@dataclasses.dataclass(frozen=True)
class Location:
    """One place a pull may go: a registries.conf ``location`` and its ``insecure`` flag."""

    location: str
    insecure: bool


@dataclasses.dataclass(frozen=True)
class Entry:
    """One ``[[registry]]`` table: ``location`` is tried after every mirror."""

    prefix: str
    location: Location
    mirrors: tuple[Location, ...]


def location_of(mirror: models.Mirror, where: str) -> tuple[Location | None, list[str]]:
    """The registries.conf location of one mirror URL, or why it has none."""
    parts = urlsplit(mirror.url)
    host = parts.netloc.lower()
    path = parts.path.rstrip("/")
    problems = []
    if path in ("", "/v2"):
        namespace = ""
    elif mirror.override_path and path.startswith("/v2/"):
        namespace = path[len("/v2"):]
    elif mirror.override_path:
        problems.append(f"{where}: {mirror.url!r} with overridePath: CRI-O always asks a mirror for "
                        f"/v2/<namespace>/..., so a path-rooted mirror must be written as https://host/v2/<namespace>")
        namespace = ""
    else:
        problems.append(f"{where}: {mirror.url!r}: CRI-O asks host/v2/..., it cannot put a path before /v2; write "
                        f"https://host/v2/<namespace> with overridePath: true if the mirror serves under a namespace")
        namespace = ""
    if mirror.capabilities != models.DEFAULT_CAPABILITIES:
        problems.append(f"{where}: capabilities {list(mirror.capabilities)}: CRI-O's mirrors serve tag and digest "
                        f"pulls alike (pull and resolve) and are never pushed to; that is the only set it can do")
    insecure = parts.scheme.lower() == "http" or mirror.skip_verify
    if problems:
        return None, problems
    return Location(host + namespace, insecure), []


def ca_path(mirror: models.Mirror) -> str:
    """Where containers/image looks for the CAs of this mirror's host (containers-certs.d(5))."""
    return posixpath.join(CERTS_D, urlsplit(mirror.url).netloc.lower(), CA_FILE)


def check_crio_mirrors(desired: Sequence[models.RegistryMirror]) -> tuple[list[Entry], dict[str, str]]:
    """The ``[[registry]]`` entries and the CA files, or refuse (naming every problem) what CRI-O cannot do."""
    models.check_unique_registries(desired)
    credentials.refuse(desired, NO_CREDENTIALS, CrioRefused)
    problems: list[str] = []
    entries: list[Entry] = []
    cas: dict[str, str] = {}
    ca_owner: dict[str, str] = {}
    for wanted in sorted(desired, key=lambda m: m.registry):
        if wanted.registry == models.ANY_REGISTRY:
            problems.append(f"registry '*' ({wanted.name}): registries.conf has no entry for every registry (a "
                            f"prefix names one registry, or *.domain for its subdomains); list the registries")
            continue
        locations: list[Location] = []
        for index, mirror in enumerate(wanted.mirrors):
            where = f"RegistryMirror {wanted.name!r} mirrors[{index}]"
            location, found = location_of(mirror, where)
            problems += found
            if location is not None:
                locations.append(location)
            if mirror.ca_bundle:
                path = ca_path(mirror)
                if path in cas and cas[path] != mirror.ca_bundle:
                    problems.append(f"{where}: caBundle differs from the one {ca_owner[path]} gives for the same "
                                    f"host; CRI-O trusts one set of CAs per host ({posixpath.dirname(path)})")
                cas.setdefault(path, mirror.ca_bundle if mirror.ca_bundle.endswith("\n") else mirror.ca_bundle + "\n")
                ca_owner.setdefault(path, f"{wanted.name!r}")
        if not locations or len(locations) != len(wanted.mirrors):
            continue
        if wanted.upstream == models.UPSTREAM_NEVER:
            entries.append(Entry(wanted.registry, locations[-1], tuple(locations[:-1])))
        else:
            entries.append(Entry(wanted.registry, Location(wanted.registry, False), tuple(locations)))
    if problems:
        raise CrioRefused("; ".join(problems) + "; nothing was changed")
    return entries, cas


def _quote(text: str) -> str:
    return json.dumps(text)  # a TOML basic string, for the ASCII the models admit


def render_drop_in(entries: Sequence[Entry]) -> str:
    """The drop-in: deterministic, one ``[[registry]]`` per entry in prefix order, mirrors in the user's order."""
    lines = [HEADER]
    for entry in sorted(entries, key=lambda e: e.prefix):
        lines += ["[[registry]]", f"prefix = {_quote(entry.prefix)}", f"location = {_quote(entry.location.location)}"]
        if entry.location.insecure:
            lines.append("insecure = true")
        for mirror in entry.mirrors:
            lines += ["", "[[registry.mirror]]", f"location = {_quote(mirror.location)}"]
            if mirror.insecure:
                lines.append("insecure = true")
        lines.append("")
    return "\n".join(lines)


def parse_entries(text: str, where: str) -> list[Entry]:
    """The v2 ``[[registry]]`` entries of one registries.conf file (v1 tables carry no mirrors)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CrioRefused(f"{where} is not valid TOML: {exc}; CRI-O cannot read it either. Fix it by hand first, "
                          f"regmirror changed nothing") from exc
    entries = []
    for raw in doc.get("registry", []) if isinstance(doc.get("registry"), list) else []:
        if not isinstance(raw, dict):
            continue
        prefix = str(raw.get("prefix") or raw.get("location") or "")
        location = Location(str(raw.get("location") or prefix), bool(raw.get("insecure", False)))
        mirrors = tuple(Location(str(m.get("location", "")), bool(m.get("insecure", False)))
                        for m in raw.get("mirror", []) if isinstance(m, dict))
        entries.append(Entry(prefix, location, mirrors))
    return entries


def _node_files(view: NodeView, drop_in: str) -> list[str]:
    """registries.conf and every drop-in CRI-O reads, in the order it reads them."""
    folder = posixpath.dirname(drop_in)
    drop_ins = sorted(p for p in view.glob(posixpath.join(folder, "*.conf")) if view.read(p) is not None)
    return [REGISTRIES_CONF, *drop_ins]


def check_not_replaced(view: NodeView, entries: Sequence[Entry], drop_in: str) -> tuple[str, ...]:
    """Refuse when a drop-in read after regmirror's has one of its prefixes (it would replace regmirror's entry,
    so the mirrors would never be in force); note each node entry regmirror's replaces while it is there."""
    prefixes = {e.prefix for e in entries}
    notes = []
    problems = []
    for path in _node_files(view, drop_in):
        text = view.read(path)
        if path == drop_in or text is None:
            continue
        for entry in parse_entries(text, path):
            if entry.prefix not in prefixes:
                continue
            if path != REGISTRIES_CONF and posixpath.basename(path) > posixpath.basename(drop_in):
                problems.append(f"{path} has a [[registry]] for {entry.prefix!r} and is read after {drop_in}, so it "
                                f"would replace regmirror's mirrors; move that entry into a file named before "
                                f"{posixpath.basename(drop_in)} or remove it")
            else:
                notes.append(f"{path}'s own [[registry]] for {entry.prefix!r} is replaced by regmirror's while its "
                             f"mirrors are set (CRI-O keeps one entry per prefix); reset brings it back")
    if problems:
        raise CrioRefused("; ".join(problems) + "; nothing was changed")
    return tuple(notes)


def plan_crio(desired: Sequence[models.RegistryMirror], view: NodeView, state: ownership.State,
              options: Options = Options()) -> Plan:
    entries, cas = check_crio_mirrors(desired)
    notes = check_not_replaced(view, entries, options.drop_in) if entries else ()
    files: dict[str, str] = dict(cas)
    if entries:
        text = render_drop_in(entries)
        parse_entries(text, options.drop_in)  # what CRI-O would refuse is never written
        files[options.drop_in] = text

    def undo(_: str, current: str | None, original: str | None) -> str | None:
        return original  # every file is regmirror's whole: the node's own content (usually none) comes back

    return ownership.plan_owned_files(runtime=RUNTIME, view=view, state=state, state_path=options.state_path,
                                      desired=files, restart_paths=frozenset({options.drop_in}), undo=undo,
                                      notes=notes)


def has_crio(view: NodeView) -> bool:
    """CRI-O is set up here: its crio.conf, or anything in /etc/crio."""
    return view.read(posixpath.join(CRIO_DIR, "crio.conf")) is not None or bool(view.glob(f"{CRIO_DIR}/*"))


def describe(view: NodeView, drop_in: str = DROP_IN) -> tuple[str, list[Effective]]:
    """What CRI-O will use after its next reload: the merged entries of registries.conf and its drop-ins, each
    with its mirrors then its location when that is not the registry itself (``upstream: Never``)."""
    merged: dict[str, tuple[Entry, str]] = {}
    for path in _node_files(view, drop_in):
        text = view.read(path)
        if text is not None:
            for entry in parse_entries(text, path):
                merged[entry.prefix] = (entry, path)
    present = "present" if view.read(drop_in) is not None else "absent (no mirrors of regmirror's)"
    rows = []
    for prefix, (entry, path) in sorted(merged.items()):
        chain = [m.location for m in entry.mirrors]
        if entry.location.location != prefix:
            chain.append(entry.location.location)
        if chain:
            rows.append(Effective(prefix, tuple(chain), path))
    return f"{drop_in}: {present}", rows


def reload_argv(how: str, has_systemctl: bool) -> list[str]:
    """How to make CRI-O re-read registries (``how``: auto | systemd; command:CMD is run as given elsewhere)."""
    if has_systemctl or how == "systemd":
        return ["systemctl", "reload", RUNTIME]
    return ["sh", "-c", "pid=$(pidof crio) && kill -HUP $pid"]
