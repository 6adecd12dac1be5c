"""The RegistryMirror model: what a user asks for, validated once, shared by the CLI, the agent and the operator.

Everything here is pure. Parsing collects every problem in a document at once (a user fixing a YAML file
wants the whole list, not one error per run), and each message quotes the bad value and says what was
expected. The same rules are enforced at admission by the CRD (``crds/``); ``tests/unit/test_models.py``
keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from regmirror_api import fingerprints
from regmirror_api.errors import InvalidSpec

__all__ = [
    "Credentials",
    "InvalidSpec",
    "Mirror",
    "RegistryMirror",
    "check_mirror_url",
    "check_registry",
    "check_unique_registries",
    "parse_cli_mirror",
    "parse_cli_mirrors",
    "parse_document",
    "parse_spec",
]

API_GROUP = "regmirror.io"
API_VERSION = "v1alpha1"
KIND = "RegistryMirror"
PLURAL = "registrymirrors"

MAX_MIRRORS = 10
#: containerd keeps a registry's settings in ``certs.d/<host:port>`` or ``certs.d/<host_port_>`` (RUNTIME-NOTES),
#: and a file name holds at most 255 bytes: 253 (the DNS limit for a host name) leaves room for the ``_``.
MAX_REGISTRY_LENGTH = 253
MAX_URL_LENGTH = 2048
MAX_CA_BUNDLE_LENGTH = 65536
SPEC_FIELDS = ("registry", "mirrors", "nodeSelector", "upstream", "rewriteImages", "verify")
#: ``spec.upstream``: whether the upstream registry may serve when no mirror answers (OpenShift calls ``Never``
#: NeverContactSource). Only containerd in hosts mode can do ``Never``; Docker always falls back to Docker Hub.
UPSTREAM_FALLBACK = "Fallback"
UPSTREAM_NEVER = "Never"
UPSTREAM_VALUES = (UPSTREAM_FALLBACK, UPSTREAM_NEVER)
#: The node selection is the operator's and the agent's business (``regmirror_api.contract``), not the mirror's.
CAPABILITIES = ("pull", "resolve", "push")
DEFAULT_CAPABILITIES = ("pull", "resolve")

#: Docker Hub's canonical name; containerd looks up ``certs.d/docker.io``, never the aliases below.
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("registry-1.docker.io", "index.docker.io", "registry.hub.docker.com")
#: ``*`` mirrors every registry that has no configuration of its own (containerd's ``_default``).
ANY_REGISTRY = "*"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
REGISTRY_PATTERN = rf"^(?:\*|{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?)$"
_REGISTRY_RE = re.compile(REGISTRY_PATTERN)
#: What a mirror URL is: the one definition the CRD repeats (``tests/e2e/test_api.py`` checks both agree).
#: Stricter than RFC 3986 where containerd is: Go's url.Parse, which containerd runs on every ``[host."<url>"]``,
#: refuses a malformed ``%`` escape anywhere and any ``%`` escape in the host, and one URL it cannot parse makes
#: containerd ignore the whole hosts.toml, the good mirrors with it. So: http(s), a host name or IPv4 address
#: of letters, digits, ``-``, ``_`` and dots (punycode for international names), a port 1-65535 written without
#: leading zeros, and a path of RFC 3986 path characters and ``%XX`` escapes. No credentials, query or fragment.
_URL_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_URL_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_URL_PATH = r"(?:/(?:[A-Za-z0-9._~!$&()*+,;=:@/-]|%[0-9A-Fa-f]{2})*)?"
MIRROR_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]?://{_URL_LABEL}(?:\.{_URL_LABEL})*(?::{_URL_PORT})?{_URL_PATH}$"
_MIRROR_URL_RE = re.compile(MIRROR_URL_PATTERN)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: A Kubernetes label key, ``[prefix/]name``, as the CRD's nodeSelector checks it; a value is at most 63 characters.
LABEL_KEY_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                     r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_KEY_RE = re.compile(LABEL_KEY_PATTERN)
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
#: Characters that would let a URL break out of a TOML string or a JSON document, or that no URL needs.
_URL_FORBIDDEN = re.compile(r"[\s\"'\\`<>{}|^\[\]]")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 100
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 4, 4


def _show(value: object) -> str:
    """A value quoted for a message, cut short: a message must name the bad value, not reproduce a 64 KB one
    (nor spend time on a YAML alias bomb: reprlib stops at a few levels and items, where repr would not)."""
    return _REPR.repr(value)


#: A Secret's name (a DNS subdomain, as the apiserver names objects); the CRD repeats it.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_SECRET_NAME_RE = re.compile(SECRET_NAME_PATTERN)
MAX_SECRET_NAME_LENGTH = 253
MAX_RESOURCE_VERSION_LENGTH = 64


@dataclasses.dataclass(frozen=True)
class Credentials:
    """``mirrors[].credentials``: the Secret (in the install's namespace) whose username and password the node
    sends to this mirror, and nothing of its content.

    containerd sends a registry's credentials only to the host they were issued for (containerd #10540), so a
    node's pull secret for quay.io never reaches a mirror host; a mirror that wants them needs its own.
    ``version`` says which content is meant without holding it: the Secret's resourceVersion, which the operator
    publishes so that a rotated Secret changes the document every agent watches (a hash of the data would be
    brute-forceable for a weak password); the CLI puts its credentials file's identity there.
    ``authorization`` is the resolved header value, filled in on the node only, never rendered by ``to_spec``
    and never shown by ``repr``."""

    secret_name: str
    version: str = ""
    authorization: str = dataclasses.field(default="", repr=False)
    source: str = ""
    """Where ``authorization`` came from, for messages and the redacted view (``Secret regmirror-system/harbor``)."""

    @property
    def where(self) -> str:
        """How messages name these credentials: their resolved ``source``, else the Secret's name."""
        return self.source or f"Secret {self.secret_name!r}"

    def to_spec(self) -> dict[str, Any]:
        """The published form: the Secret's name and version. On a node, where the login is resolved, also its
        keyed fingerprint (``fingerprints``), so that the engine's request key changes with the login itself, even
        when the published resourceVersion has not caught up (the operator away) or for a CLI credentials file."""
        spec: dict[str, Any] = {"secretName": self.secret_name}
        if self.version:
            spec["resourceVersion"] = self.version
        if self.authorization:
            spec["login"] = fingerprints.fingerprint(self.authorization)
        return spec


@dataclasses.dataclass(frozen=True)
class Mirror:
    """One mirror endpoint, tried in list order before the upstream registry."""

    url: str
    skip_verify: bool = False
    ca_bundle: str | None = None
    override_path: bool = False
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    credentials: Credentials | None = None

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"url": self.url}
        if self.skip_verify:
            spec["skipVerify"] = True
        if self.ca_bundle:
            spec["caBundle"] = self.ca_bundle
        if self.override_path:
            spec["overridePath"] = True
        if self.capabilities != DEFAULT_CAPABILITIES:
            spec["capabilities"] = list(self.capabilities)
        if self.credentials is not None:
            spec["credentials"] = self.credentials.to_spec()
        return spec


@dataclasses.dataclass(frozen=True)
class RegistryMirror:
    """The desired mirrors of one upstream registry. ``name`` is the object's name, or a CLI-made one."""

    name: str
    registry: str
    mirrors: tuple[Mirror, ...]
    generation: int = 0
    upstream: str = UPSTREAM_FALLBACK
    """``Fallback``: the upstream registry serves when no mirror does; ``Never``: it is never contacted."""
    rewrite_images: bool = False
    """``spec.rewriteImages``: Pods' images of this registry are renamed to the first mirror at admission
    (``regmirror_operator.rewriting``); see :func:`image_prefix` for the name."""
    verify_image: str | None = None
    """``spec.verify.image``: an image of this registry that each node resolves through its runtime's
    configuration, to prove the mirror answers (``regmirror_agent.verifying``)."""

    def with_credentials(self, change: Callable[[Mirror, Credentials], Credentials]) -> RegistryMirror:
        """This RegistryMirror with each mirror's credentials (where it has some) replaced by ``change(mirror,
        credentials)``: the operator adds the Secret's version, a node its resolved login."""
        if not any(m.credentials for m in self.mirrors):
            return self
        return dataclasses.replace(self, mirrors=tuple(
            dataclasses.replace(m, credentials=change(m, m.credentials)) if m.credentials is not None else m
            for m in self.mirrors))

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"registry": self.registry, "mirrors": [m.to_spec() for m in self.mirrors]}
        if self.upstream != UPSTREAM_FALLBACK:  # the default is left out: published bytes stay as they were
            spec["upstream"] = self.upstream
        if self.rewrite_images:  # likewise
            spec["rewriteImages"] = True
        if self.verify_image:  # likewise
            spec["verify"] = {"image": self.verify_image}
        return spec


def check_registry(registry: object, where: str = "registry") -> list[str]:
    """Problems with an upstream registry name (``host[:port]``, ``docker.io`` or ``*``)."""
    if not isinstance(registry, str) or not registry:
        return [f"{where}: must be a registry host such as \"quay.io\", \"docker.io\" or \"*\", got {_show(registry)}"]
    if registry in DOCKER_HUB_ALIASES:
        return [f"{where}: {registry!r} is an alias of Docker Hub; containerd only reads configuration "
                f"written for {DOCKER_HUB!r}, so write {DOCKER_HUB!r}"]
    if len(registry) > MAX_REGISTRY_LENGTH:
        return [f"{where}: {registry[:60]!r}... is {len(registry)} characters long; a registry name has at "
                f"most {MAX_REGISTRY_LENGTH} characters, because containerd keeps a registry's settings in a "
                f"directory named after it (certs.d/host_port_ for host:port) and a directory name holds at most "
                f"255 bytes"]
    if not _REGISTRY_RE.match(registry):
        return [f"{where}: {registry!r} is not a registry host: expected host[:port] in lower case "
                f"(for example \"quay.io\" or \"registry.example.com:5000\"), \"docker.io\" or \"*\""]
    if ":" in registry and not 0 < int(registry.rsplit(":", 1)[1]) < 65536:
        return [f"{where}: {registry!r} has a port outside 1-65535"]
    return []


def check_mirror_url(url: object, where: str = "url") -> list[str]:
    """Problems with a mirror URL: absolute http(s), nothing that could escape a config file."""
    if not isinstance(url, str) or not url:
        return [f"{where}: must be an absolute http(s) URL such as \"https://mirror.example.com\", got {_show(url)}"]
    if len(url) > MAX_URL_LENGTH:
        return [f"{where}: longer than {MAX_URL_LENGTH} characters"]
    if not url.isascii():
        return [f"{where}: {url!r} has non-ASCII characters; write an international host name in its "
                f"punycode (xn--) form and percent-encode the path"]
    bad = _URL_FORBIDDEN.search(url)
    if bad or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return [f"{where}: {url!r} contains a character no mirror URL may hold "
                f"(whitespace, quotes, backslash, brackets or control characters)"]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [f"{where}: {url!r} is not a valid URL ({exc})"]
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return [f"{where}: {url!r} is not an absolute http:// or https:// URL"]
    if "@" in parts.netloc:
        return [f"{where}: {url!r} carries credentials; put them in a Secret that the mirror's "
                f"credentials.secretName names, never in a mirror URL"]
    if "?" in url or "#" in url:
        return [f"{where}: {url!r} has a query or fragment; a mirror URL is scheme://host[:port][/path]"]
    if port is not None and (not 0 < port < 65536 or parts.netloc.rsplit(":", 1)[1].startswith("0")):
        return [f"{where}: {url!r} has a port outside 1-65535 (or written with leading zeros)"]
    if "%" in parts.netloc or _BAD_ESCAPE.search(url):
        return [f"{where}: {url!r} has a % that is not a %XX escape, or an escape in the host name; containerd "
                f"cannot parse it and would ignore every mirror of this registry"]
    if not _MIRROR_URL_RE.match(url):
        return [f"{where}: {url!r} is not a mirror URL containerd reads: expected http(s)://host[:port][/path], a "
                f"host of letters, digits, '-', '_' and dots, a port 1-65535, a path of URL path characters"]
    return []


def check_node_selector(selector: object, where: str = "spec.nodeSelector") -> list[str]:
    """Problems with a nodeSelector (a metav1.LabelSelector), by the CRD's rules; empty or absent is fine."""
    if selector is None:
        return []
    if not isinstance(selector, Mapping):
        return [f"{where}: must be a label selector object with matchLabels and/or matchExpressions, "
                f"got {_show(selector)}"]
    problems = []
    unknown = sorted(map(str, set(selector) - {"matchLabels", "matchExpressions"}))
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; expected matchLabels, "
                        f"matchExpressions")
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or len(labels) > 64:
        problems.append(f"{where}.matchLabels: must map at most 64 label keys to values, got {_show(labels)}")
        labels = {}
    for key, value in labels.items():
        if value is None:
            continue  # the apiserver drops a null map value; so does without_nulls
        if not isinstance(key, str) or not _LABEL_KEY_RE.match(key):
            problems.append(f"{where}.matchLabels: {key!r} is not a label key ([prefix/]name, name at most 63 "
                            f"characters of letters, digits, '-', '_' and '.')")
        if not isinstance(value, str) or len(value) > 63:
            problems.append(f"{where}.matchLabels[{key!r}]: must be a label value of at most 63 characters, "
                            f"got {_show(value)}")
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list) or len(expressions) > 32:
        problems.append(f"{where}.matchExpressions: must be a list of at most 32 requirements, "
                        f"got {_show(expressions)}")
        expressions = []
    for i, expr in enumerate(expressions):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            problems.append(f"{at}: must be an object with key, operator and values, got {_show(expr)}")
            continue
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values")
        unknown = sorted(map(str, set(expr) - {"key", "operator", "values"}))
        if unknown:
            problems.append(f"{at}: unknown field(s) {', '.join(map(repr, unknown))}; expected key, operator, values")
        if not isinstance(key, str) or not key or len(key) > 317:
            problems.append(f"{at}.key: must be a label key, got {_show(key)}")
        if op not in SELECTOR_OPERATORS:
            problems.append(f"{at}.operator: {_show(op)} is not one of {', '.join(SELECTOR_OPERATORS)}")
        if values is not None and (not isinstance(values, list) or len(values) > 64
                                   or not all(isinstance(v, str) and len(v) <= 63 for v in values)):
            problems.append(f"{at}.values: must be a list of at most 64 label values, got {_show(values)}")
        elif op in SELECTOR_OPERATORS and (op in ("In", "NotIn")) != bool(values):
            problems.append(f"{at}: operator {op} " + ("needs at least one value" if op in ("In", "NotIn")
                                                       else "takes no values"))
    return problems


def without_nulls(selector: Mapping[str, Any]) -> dict[str, Any]:
    """A checked nodeSelector as the apiserver stores it: a ``matchLabels`` entry whose value is null is
    dropped, not matched against a label."""
    labels = selector.get("matchLabels") or {}
    return {**selector, "matchLabels": {k: v for k, v in labels.items() if v is not None}}


def parse_mirror(raw: object, where: str) -> tuple[Mirror | None, list[str]]:
    """Build a Mirror from its camelCase spec (a plain URL string is accepted as shorthand)."""
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, Mapping):
        return None, [f"{where}: must be an object with a \"url\", got {_show(raw)}"]
    problems: list[str] = []
    unknown = sorted(map(str, set(raw) - {"url", "skipVerify", "caBundle", "overridePath", "capabilities",
                                          "credentials"}))
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; expected url, skipVerify, "
                        f"caBundle, overridePath, capabilities, credentials")
    url = raw.get("url")
    problems += check_mirror_url(url, f"{where}.url")
    for flag in ("skipVerify", "overridePath"):
        if not isinstance(raw.get(flag, False), bool):
            problems.append(f"{where}.{flag}: must be true or false, got {_show(raw[flag])}")
    ca = raw.get("caBundle")
    if ca is not None:
        if not isinstance(ca, str) or "-----BEGIN CERTIFICATE-----" not in ca:
            problems.append(f"{where}.caBundle: must be PEM text holding at least one "
                            f"\"-----BEGIN CERTIFICATE-----\" block")
        elif len(ca) > MAX_CA_BUNDLE_LENGTH:
            problems.append(f"{where}.caBundle: longer than {MAX_CA_BUNDLE_LENGTH} characters")
    caps = raw.get("capabilities", list(DEFAULT_CAPABILITIES))
    if (not isinstance(caps, list) or not caps or any(c not in CAPABILITIES for c in caps)
            or len(set(caps)) != len(caps)):
        problems.append(f"{where}.capabilities: {_show(caps)} must be a non-empty list of distinct values "
                        f"from {list(CAPABILITIES)}")
    credentials, found = parse_credentials(raw.get("credentials"), f"{where}.credentials")
    problems += found
    if problems:
        return None, problems
    ordered = tuple(c for c in CAPABILITIES if c in caps)
    return Mirror(url=str(url), skip_verify=bool(raw.get("skipVerify", False)), ca_bundle=ca or None,
                  override_path=bool(raw.get("overridePath", False)), capabilities=ordered,
                  credentials=credentials), []


def parse_credentials(raw: object, where: str) -> tuple[Credentials | None, list[str]]:
    """``credentials: {secretName: NAME}`` (the operator adds ``resourceVersion`` in what it publishes)."""
    if raw is None:
        return None, []
    if not isinstance(raw, Mapping):
        return None, [f"{where}: must be an object with a \"secretName\", got {_show(raw)}"]
    problems = []
    unknown = sorted(map(str, set(raw) - {"secretName", "resourceVersion"}))
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; expected secretName")
    name = raw.get("secretName")
    if not isinstance(name, str) or len(name) > MAX_SECRET_NAME_LENGTH or not _SECRET_NAME_RE.match(name):
        problems.append(f"{where}.secretName: {_show(name)} is not a Secret name (lower-case letters, digits, '-' "
                        f"and '.', at most {MAX_SECRET_NAME_LENGTH} characters); the Secret lives in the install's "
                        f"namespace")
    version = raw.get("resourceVersion", "")
    if not isinstance(version, str) or len(version) > MAX_RESOURCE_VERSION_LENGTH:
        problems.append(f"{where}.resourceVersion: must be a resourceVersion string, got {_show(version)}")
    if problems:
        return None, problems
    return Credentials(secret_name=str(name), version=str(version)), []


def parse_spec(name: str, spec: object, generation: int = 0, where: str = "spec") -> RegistryMirror:
    """Validate a RegistryMirror spec; raise InvalidSpec listing every problem."""
    if not isinstance(spec, Mapping):
        raise InvalidSpec([f"{where}: must be an object with \"registry\" and \"mirrors\""])
    problems = check_registry(spec.get("registry"), f"{where}.registry")
    unknown = sorted(map(str, set(spec) - set(SPEC_FIELDS)))
    if unknown:  # a misspelt field would otherwise be dropped without a word, as the CRD would refuse it
        problems.append(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; expected "
                        f"{', '.join(SPEC_FIELDS)}")
    problems += check_node_selector(spec.get("nodeSelector"), f"{where}.nodeSelector")
    upstream = spec.get("upstream", UPSTREAM_FALLBACK)
    if upstream not in UPSTREAM_VALUES:
        problems.append(f"{where}.upstream: {_show(upstream)} is not one of {', '.join(UPSTREAM_VALUES)} "
                        f"(Fallback: the upstream registry serves when no mirror answers; Never: it is never "
                        f"contacted)")
    raw_mirrors = spec.get("mirrors")
    mirrors: list[Mirror] = []
    if not isinstance(raw_mirrors, list) or not raw_mirrors:
        problems.append(f"{where}.mirrors: must list at least one mirror")
        raw_mirrors = []
    elif len(raw_mirrors) > MAX_MIRRORS:
        problems.append(f"{where}.mirrors: {len(raw_mirrors)} mirrors given, at most {MAX_MIRRORS} allowed")
    for i, raw in enumerate(raw_mirrors[:MAX_MIRRORS + 1]):  # a list of a million is judged by its start
        mirror, found = parse_mirror(raw, f"{where}.mirrors[{i}]")
        problems += found
        if mirror:
            mirrors.append(mirror)
    urls = [m.url for m in mirrors]
    for dup in sorted({u for u in urls if urls.count(u) > 1}):
        problems.append(f"{where}.mirrors: {dup!r} is listed more than once")
    rewrite = spec.get("rewriteImages", False)
    problems += check_rewrite_images(rewrite, spec.get("registry"), mirrors[:1], f"{where}.rewriteImages")
    verify = spec.get("verify")
    problems += check_verify(verify, spec.get("registry"), f"{where}.verify")
    if problems:
        raise InvalidSpec(problems)
    return RegistryMirror(name=name, registry=str(spec["registry"]), mirrors=tuple(mirrors), generation=generation,
                          upstream=str(upstream), rewrite_images=rewrite is True,
                          verify_image=str(verify["image"]) if isinstance(verify, Mapping) else None)


def parse_document(doc: object, index: int = 0) -> RegistryMirror:
    """Validate one ``kind: RegistryMirror`` document as written for ``kubectl apply``."""
    where = f"document {index + 1}"
    if not isinstance(doc, Mapping):
        raise InvalidSpec([f"{where}: not a YAML mapping"])
    problems = []
    if doc.get("apiVersion") != f"{API_GROUP}/{API_VERSION}" or doc.get("kind") != KIND:
        problems.append(f"{where}: expected apiVersion {API_GROUP}/{API_VERSION} and kind {KIND}, got "
                        f"{_show(doc.get('apiVersion'))} {_show(doc.get('kind'))}")
    meta = doc.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise InvalidSpec([*problems, f"{where}: metadata must be an object with a name, got {_show(meta)}"])
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: metadata.name is missing")
    generation = meta.get("generation") or 0
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        problems.append(f"{where}: metadata.generation must be a whole number 0 or more, got {_show(generation)}")
    if problems:
        raise InvalidSpec(problems)
    return parse_spec(str(name), doc.get("spec"), int(generation), where=f"{name}: spec")


def parse_cli_mirror(arg: str) -> RegistryMirror:
    """Parse ``--mirror REGISTRY=URL[,URL...]``; the name is derived so the same flag always names the same."""
    registry, sep, urls = arg.partition("=")
    where = f"--mirror {arg!r}"
    if not sep or not urls:
        raise InvalidSpec([f"{where}: expected REGISTRY=URL[,URL...], "
                           f"for example quay.io=https://quay.tencentcloudcr.com"])
    return parse_spec(f"cli-{registry}", {"registry": registry, "mirrors": urls.split(",")}, where=where)


def parse_cli_mirrors(args: Iterable[str]) -> list[RegistryMirror]:
    """Every ``--mirror`` flag, with the problems of all of them reported together."""
    result, problems = [], []
    for arg in args:
        try:
            result.append(parse_cli_mirror(arg))
        except InvalidSpec as exc:
            problems += exc.problems
    if problems:
        raise InvalidSpec(problems)
    return result


def check_unique_registries(mirrors: Iterable[RegistryMirror]) -> None:
    """Two mirror sets for one registry cannot both win on a node: refuse instead of guessing."""
    seen: dict[str, str] = {}
    problems = []
    for m in mirrors:
        if m.registry in seen:
            problems.append(f"registry {m.registry!r} is mirrored twice ({seen[m.registry]!r} and {m.name!r}); "
                            f"give each registry one RegistryMirror")
        seen.setdefault(m.registry, m.name)
    if problems:
        raise InvalidSpec(problems)


#: One path component of an image name (the distribution spec's ``[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*``).
_IMAGE_PATH = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


def image_prefix(mirror: Mirror) -> str | None:
    """The name under which ``mirror`` serves an upstream image: ``host[:port]`` plus, for a mirror whose URL
    has a path, that path; None when no image name reaches the mirror's URL.

    A runtime pulls ``NAME/REPO`` from ``https://NAME-HOST/v2/NAME-PATH/REPO/...``. A mirror URL without a path
    is thus reached by ``host[:port]/REPO``, and one with ``overridePath`` and a path ``/v2/P`` (a Harbor proxy
    project: ``https://harbor.example.com/v2/quay-proxy``) by ``host[:port]/P/REPO``. Without ``overridePath``
    containerd puts ``/v2`` after the path (``https://h/P/v2/REPO``), which no image name produces.
    """
    parts = urlsplit(mirror.url)
    host = parts.netloc.lower()
    path = parts.path.rstrip("/")
    if not path:
        return host
    if mirror.override_path and path.startswith("/v2/") and _IMAGE_PATH.match(path[len("/v2/"):]):
        return f"{host}/{path[len('/v2/'):]}"
    return None


def check_rewrite_images(value: object, registry: object, first: list[Mirror], where: str) -> list[str]:
    """Problems with ``spec.rewriteImages``: a boolean, for one named registry, whose first mirror serves images
    under a name (:func:`image_prefix`)."""
    if not isinstance(value, bool):
        return [f"{where}: must be true or false, got {_show(value)}"]
    if not value:
        return []
    if registry == ANY_REGISTRY:
        return [f"{where}: cannot rewrite the images of \"*\" (every registry): an image renamed to one mirror "
                f"would lose the registry it came from; name the registry"]
    if first and image_prefix(first[0]) is None:
        return [f"{where}: the first mirror {first[0].url!r} serves no image name: expected a URL without a path "
                f"(https://quay.tencentcloudcr.com), or overridePath: true with a path /v2/<project> of lower-case "
                f"image path characters (https://harbor.example.com/v2/quay-proxy)"]
    return []


MAX_IMAGE_LENGTH = 512
#: ``spec.verify.image``: ``host[:port]/path[:tag]`` or ``...@sha256:<64 hex>``; the path as the distribution spec
#: has it, a tag of at most 128 word characters, dots and dashes (the CRD repeats it).
VERIFY_IMAGE_PATTERN = (r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?"
                        r"(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                        r"(@sha256:[a-f0-9]{64})?$")
_VERIFY_IMAGE_RE = re.compile(VERIFY_IMAGE_PATTERN)


def check_verify(verify: object, registry: object, where: str = "spec.verify") -> list[str]:
    """Problems with ``spec.verify`` (``{image: REF}``): a full image reference in the mirrored registry."""
    if verify is None:
        return []
    if not isinstance(verify, Mapping) or set(verify) != {"image"}:
        return [f"{where}: must be an object with only \"image\", got {_show(verify)}"]
    image = verify["image"]
    if not isinstance(image, str) or len(image) > MAX_IMAGE_LENGTH or not _VERIFY_IMAGE_RE.match(image):
        return [f"{where}.image: {_show(image)} is not a full image reference: expected registry/path[:tag] or "
                f"registry/path@sha256:<digest> (for example \"quay.io/regmirror-test/sleeper:1\")"]
    host = image.split("/", 1)[0]
    if registry not in (ANY_REGISTRY, host):
        return [f"{where}.image: {image!r} is in registry {host!r}, not {registry!r}: the image must come from "
                f"the registry this object mirrors"]
    return []
