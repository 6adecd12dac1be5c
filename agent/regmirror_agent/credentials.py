"""Mirror credentials: from a Secret's data or a Docker ``config.json`` to an ``Authorization`` header, and the
header hidden again in everything regmirror shows or keeps.

Why a header: containerd sends a registry's credentials only to the host they were issued for (containerd
#10540), and hosts.toml has no username or password field; a static ``[host."<url>".header]`` ``Authorization``
is what containerd sends with every request to that host (RUNTIME-NOTES). The header lives only in the mirror's
hosts.toml, written mode 0600 (``applying``); every other view of the file (``--dry-run`` diffs, the state
file's records, the digest of what a plan read, error messages) goes through :func:`redact` first, which
replaces the value with the Secret's name.

Where they come from:

- a Secret of type ``kubernetes.io/basic-auth`` (keys ``username`` and ``password``), or
  ``kubernetes.io/dockerconfigjson`` (``.dockerconfigjson``: the ``auths`` entry for the mirror's
  ``host[:port]``, with ``auth`` = base64(user:password) or ``username``/``password``): what
  ``kubectl create secret docker-registry`` makes;
- for ``regmirror apply --credentials FILE``, the same ``{"auths": {...}}`` document, which node bootstrap
  scripts already have.

Pure: no I/O. A problem is a :class:`CredentialsProblem` whose message names the Secret and what is wrong with
it, never anything of its content.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from regmirror_api import models
from regmirror_api.errors import RegmirrorError

BASIC_AUTH = "kubernetes.io/basic-auth"
DOCKER_CONFIG_JSON = "kubernetes.io/dockerconfigjson"
DOCKER_CONFIG_KEY = ".dockerconfigjson"
TYPES = (BASIC_AUTH, DOCKER_CONFIG_JSON)
#: The comment line written right above the header, naming where it came from; :func:`redact` reads it back.
SOURCE_COMMENT = "# Authorization from "
REDACTED = "<redacted>"


class CredentialsProblem(RegmirrorError, ValueError):
    """A Secret (or credentials file) that gives no usable credentials for a mirror; the message says which and
    why, and nothing of what it holds."""


@dataclasses.dataclass(frozen=True)
class Login:
    username: str
    password: str = dataclasses.field(repr=False)

    def authorization(self) -> str:
        """The ``Authorization`` header value containerd sends (HTTP Basic, RFC 7617)."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


def mirror_host(url: str) -> str:
    """``host[:port]`` of a mirror URL, lower case: the key of its ``auths`` entry."""
    return urlsplit(url).netloc.lower()


def source(secret_name: str, namespace: str) -> str:
    """How a Secret is named in messages and in the redacted header: ``Secret regmirror-system/harbor``."""
    return f"Secret {namespace}/{secret_name}" if namespace else f"credentials {secret_name!r}"


def _decode(value: object, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise CredentialsProblem(f"{where}: {what} is missing")
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialsProblem(f"{where}: {what} is not base64-encoded UTF-8 text") from None


def _check(login: Login, where: str) -> Login:
    if not login.username or ":" in login.username:
        raise CredentialsProblem(f"{where}: the username is empty or holds a ':' (HTTP Basic cannot carry it)")
    if not login.password:
        raise CredentialsProblem(f"{where}: the password is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in login.username + login.password):
        raise CredentialsProblem(f"{where}: the username or password holds a control character")
    return login


def auths_entry(auths: Mapping[str, object], host: str) -> object:
    """The ``auths`` entry for ``host``, None when there is none."""
    for key, value in auths.items():
        name = str(key)
        if "://" in name:
            name = urlsplit(name).netloc
        if name.rstrip("/").lower() == host:
            return value
    return None


def login_from_auths(doc: object, host: str, where: str) -> Login:
    """The login for ``host`` in a Docker ``config.json`` document (``{"auths": {host: {...}}}``). The entry's key
    may be ``host``, ``https://host`` or ``http://host`` (with any path), as ``docker login`` writes them."""
    auths = doc.get("auths") if isinstance(doc, Mapping) else None
    if not isinstance(auths, Mapping):
        raise CredentialsProblem(f"{where}: has no \"auths\" object (expected a Docker config.json document)")
    entry = auths_entry(auths, host)
    if not isinstance(entry, Mapping):
        raise CredentialsProblem(f"{where}: has no \"auths\" entry for the mirror host {host!r}")
    if entry.get("auth"):
        text = _decode(entry.get("auth"), f"auths[{host!r}].auth", where)
        user, sep, password = text.partition(":")
        if not sep:
            raise CredentialsProblem(f"{where}: auths[{host!r}].auth is not base64 of username:password")
        return _check(Login(user, password), where)
    name, secret = entry.get("username"), entry.get("password")
    if not isinstance(name, str) or not isinstance(secret, str):
        raise CredentialsProblem(f"{where}: auths[{host!r}] has neither \"auth\" nor \"username\" and \"password\"")
    return _check(Login(name, secret), where)


def login_from_secret(secret: Mapping[str, object], host: str, where: str) -> Login:
    """The login a Secret object (as the apiserver returns it: ``type``, base64 ``data``) gives for ``host``."""
    kind = secret.get("type")
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        raise CredentialsProblem(f"{where}: has no data")
    if kind == BASIC_AUTH:
        user = _decode(data.get("username"), "the key \"username\"", where)
        password = _decode(data.get("password"), "the key \"password\"", where)
        return _check(Login(user, password), where)
    if kind == DOCKER_CONFIG_JSON:
        text = _decode(data.get(DOCKER_CONFIG_KEY), f"the key {DOCKER_CONFIG_KEY!r}", where)
        try:
            doc = json.loads(text)
        except ValueError:
            raise CredentialsProblem(f"{where}: {DOCKER_CONFIG_KEY} is not JSON") from None
        return login_from_auths(doc, host, where)
    raise CredentialsProblem(f"{where}: has type {kind!r}; expected {BASIC_AUTH} (keys username, password) or "
                             f"{DOCKER_CONFIG_JSON} (an auths entry for {host!r})")


def secret_names(mirrors: Iterable[models.RegistryMirror]) -> list[str]:
    """The Secret names the mirrors of these RegistryMirrors reference, sorted, each once."""
    return sorted({m.credentials.secret_name for rm in mirrors for m in rm.mirrors if m.credentials is not None})


# --- hiding the header again ------------------------------------------------------------------------------

#: An Authorization header's key and value in any form TOML allows: a key of its own line or of an inline table
#: (``header = {Authorization = [...]}``), bare or quoted, its value a string or an array (over several lines too).
_VALUE = r"""\[[^\]]*\]|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'"""
_HEADER = re.compile(rf"""(?i)(?P<key>["']?authorization["']?[ \t]*=[ \t]*)(?:{_VALUE})""")
#: What else a node's own config.toml may hold of a login (the CRI plugin's ``configs."<host>".auth`` table):
#: hidden in what regmirror shows, never in what it records (a record must tell the node's own edits apart).
_CONFIG_LOGIN = re.compile(
    rf"""(?im)^(?P<key>[ \t]*["']?(?:password|auth|identitytoken)["']?[ \t]*=[ \t]*)(?:{_VALUE})""")


def holds_secret(text: str | None) -> bool:
    """Does this (hosts.toml) text carry an Authorization header? Such a file is written mode 0600."""
    return bool(text) and _HEADER.search(text or "") is not None


def _label(text: str, at: int) -> str:
    """``<redacted: SOURCE>`` when the line above the one at ``at`` is regmirror's source comment."""
    line_start = text.rfind("\n", 0, at) + 1
    if line_start == 0:
        return REDACTED
    above = text[text.rfind("\n", 0, line_start - 1) + 1:line_start - 1].strip()
    return f"<redacted: {above[len(SOURCE_COMMENT):]}>" if above.startswith(SOURCE_COMMENT) else REDACTED


def redact(text: str) -> str:
    """``text`` with every Authorization header value replaced by ``["<redacted: Secret NS/NAME>"]`` (the name from
    the comment regmirror writes above it; a node's own header becomes ``["<redacted>"]``). Every record regmirror
    keeps of a file, and every view it gives, goes through this; the same text always redacts to the same text."""
    if not holds_secret(text):
        return text
    return _HEADER.sub(lambda m: f"{m.group('key')}[{json.dumps(_label(text, m.start()))}]", text)


def redact_for_view(text: str) -> str:
    """:func:`redact`, and a node's own inline registry login in config.toml (``password``, ``auth``,
    ``identitytoken``) too: for what regmirror prints (``--dry-run`` diffs), never for its records."""
    return _CONFIG_LOGIN.sub(lambda m: f"{m.group('key')}{json.dumps(REDACTED)}", redact(text))


def refuse(desired: Iterable[models.RegistryMirror], refusal: tuple[str, str],
           error: Callable[[str], Exception]) -> None:
    """Refuse, by name, mirrors with credentials where a runtime (or a mode of it) cannot carry them: ``refusal``
    is ``(the runtime, why)``, as its planner and its driver both say it; raise ``error(message)`` for the first
    one."""
    runtime, why = refusal
    for mirror in desired:
        for m in mirror.mirrors:
            if m.credentials is not None:
                raise error(f"RegistryMirror {mirror.name!r}: mirror {m.url!r} has credentials "
                            f"({m.credentials.where}), which {runtime} cannot use: {why}; nothing was changed")


# --- the CLI's credentials file ----------------------------------------------------------------------------


def parse_auths_file(text: str, where: str) -> Mapping[str, object]:
    """A Docker ``config.json``-style document (``{"auths": {"host:port": {"auth": "..."}}}``)."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise CredentialsProblem(f"{where}: not JSON (expected a Docker config.json document with \"auths\")") \
            from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("auths"), Mapping):
        raise CredentialsProblem(f"{where}: has no \"auths\" object (expected a Docker config.json document)")
    return doc


def _has_entry(doc: Mapping[str, object], host: str) -> bool:
    auths = doc.get("auths")
    return isinstance(auths, Mapping) and auths_entry(auths, host) is not None


def resolve_from_file(desired: Sequence[models.RegistryMirror], doc: Mapping[str, object], where: str,
                      version: str) -> list[models.RegistryMirror]:
    """``regmirror apply --credentials FILE``: every mirror whose ``host[:port]`` has an ``auths`` entry gets its
    login; a mirror of a ``-f`` document that names ``credentials.secretName`` must have one. ``version``
    identifies the file's content without holding it (its inode, mtime and size). Raises CredentialsProblem
    naming every mirror it cannot serve."""
    problems: list[str] = []
    result = []
    for rm in desired:
        mirrors = []
        for m in rm.mirrors:
            host = mirror_host(m.url)
            named = m.credentials is not None
            if not named and not _has_entry(doc, host):
                mirrors.append(m)
                continue
            source_text = f"credentials file {where} (auths[{host!r}])"
            try:
                login = login_from_auths(doc, host, f"credentials file {where}")
            except CredentialsProblem as exc:
                problems.append(f"RegistryMirror {rm.name!r}, mirror {m.url!r}"
                                + (f" (credentials.secretName {m.credentials.secret_name!r})" if m.credentials else "")
                                + f": {exc}")
                continue
            name = m.credentials.secret_name if m.credentials else ""
            mirrors.append(dataclasses.replace(m, credentials=models.Credentials(
                secret_name=name, version=version, authorization=login.authorization(), source=source_text)))
        result.append(dataclasses.replace(rm, mirrors=tuple(mirrors)))
    if problems:
        raise CredentialsProblem("; ".join(problems))
    return result


def unresolved(desired: Iterable[models.RegistryMirror]) -> list[str]:
    """Mirrors that name credentials nobody resolved (for the CLI without ``--credentials``)."""
    return [f"RegistryMirror {rm.name!r}, mirror {m.url!r}: names credentials.secretName "
            f"{m.credentials.secret_name!r}; on a node without the cluster, give them with --credentials FILE "
            f"(a Docker config.json with an auths entry for {mirror_host(m.url)!r})"
            for rm in desired for m in rm.mirrors if m.credentials is not None and not m.credentials.authorization]
