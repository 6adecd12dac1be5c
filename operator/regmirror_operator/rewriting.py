"""Image rewrite: which images of a Pod to rename to a mirror, as the JSON patch an admission webhook returns.

Some mirrors serve a registry's images under their own name (Tencent's TCR serves ``quay.io/x/y:1`` as
``quay.tencentcloudcr.com/x/y:1``). Docker nodes can redirect only docker.io to a mirror, so for every other
registry the image name itself must change. A RegistryMirror asks for that with ``spec.rewriteImages: true``;
the operator's mutating webhook (``main``) then calls :func:`plan_pod` for each Pod created in a namespace the
user opted in, and returns its patch.

The rules, each a reason a rewrite could do harm:

- Pods of the kubelet are left alone: a mirror Pod (annotation ``kubernetes.io/config.mirror``) stands for a
  static Pod read from the node's disk, whose spec the apiserver cannot change.
- ``imagePullPolicy: Never`` means "use the image the node already has, by this name": a new name would not
  be there.
- An image is renamed once. Nothing already on a mirror matches (the registry is part of the match), and the
  result is never matched again, so two RegistryMirrors cannot chain.
- Tags and digests are kept as written, so ``@sha256:`` pins still pin. Docker Hub's short names are spelt
  out: ``nginx`` is ``docker.io/library/nginx``, and a Docker Hub mirror serves it as ``MIRROR/library/nginx``.
- A reference this module cannot parse is left as it is: the webhook must never be why a Pod does not start.

Everything is pure, on plain dicts: no clock, environment or API.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from regmirror_api import contract, models

#: The annotation that lists what was renamed, as JSON: ``{"<container>": "<original> -> <new>", ...}``.
ANNOTATION = "regmirror.io/rewritten-images"
#: Set by the kubelet on the API copy of a static Pod.
MIRROR_POD_ANNOTATION = "kubernetes.io/config.mirror"
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
#: distribution/reference: the first component is a registry when it has a dot or a port, or is localhost.
LEGACY_DOCKER_HUB = ("index.docker.io", *models.DOCKER_HUB_ALIASES)
_REFERENCE = re.compile(
    r"^(?P<name>[a-zA-Z0-9][a-zA-Z0-9._:/-]*?)"  # [domain/]path, lazily so a tag is not taken for a port
    r"(?P<tag>:[\w][\w.-]{0,127})?"
    r"(?P<digest>@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Rename images of ``registry`` to ``prefix`` (``host[:port][/path]``); ``name`` is the RegistryMirror."""

    name: str
    registry: str
    prefix: str


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One renamed image: ``where`` is the JSON pointer of the ``image`` field."""

    where: str
    container: str
    before: str
    after: str


def plan_rules(mirrors: Iterable[models.RegistryMirror]) -> tuple[Rule, ...]:
    """The rules of the RegistryMirrors that opted in (published ones: valid, each the winner of its registry)."""
    rules = []
    for mirror in mirrors:
        prefix = models.image_prefix(mirror.mirrors[0]) if mirror.rewrite_images and mirror.mirrors else None
        if prefix is not None and mirror.registry != models.ANY_REGISTRY:
            rules.append(Rule(mirror.name, mirror.registry, prefix))
    return tuple(sorted(rules, key=lambda r: r.registry))


def plan_rules_from_desired(text: str) -> tuple[Rule, ...]:
    """The rules of a published ``desired.json``: the operator's own output, so its RegistryMirrors are valid
    and each wins its registry."""
    return plan_rules(entry.mirror() for entry in contract.parse_desired(text).entries)


class RuleBook:
    """The rules of the last ``desired.json`` seen, parsed once per new text. ``None`` (not published yet, or
    unknown after an API error) keeps the rules of the last good text."""

    def __init__(self) -> None:
        self.text: str | None = None
        self.rules: tuple[Rule, ...] = ()

    def rules_for(self, text: str | None) -> tuple[Rule, ...]:
        if text is not None and text != self.text:
            self.rules, self.text = plan_rules_from_desired(text), text
        return self.rules


def split_reference(image: str) -> tuple[str, str, str] | None:
    """``(registry, repository, tag-and-digest)`` of an image reference, Docker Hub's short forms spelt out
    (``nginx`` -> ``("docker.io", "library/nginx", "")``); None when it is not a reference."""
    match = _REFERENCE.match(image)
    if match is None:
        return None
    name, suffix = match["name"], (match["tag"] or "") + (match["digest"] or "")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first.lower(), rest
    else:
        registry, repository = models.DOCKER_HUB, name
    if registry in LEGACY_DOCKER_HUB:
        registry = models.DOCKER_HUB
    if registry == models.DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not repository or repository != repository.lower() or ":" in repository or "//" in repository:
        return None
    return registry, repository, suffix


def rewrite_image(image: str, rules: Sequence[Rule]) -> str | None:
    """The new name of ``image`` under ``rules``, or None when no rule applies."""
    parts = split_reference(image)
    if parts is None:
        return None
    registry, repository, suffix = parts
    for rule in rules:
        if rule.registry == registry:
            return f"{rule.prefix}/{repository}{suffix}"
    return None


def is_kubelet_pod(pod: Mapping[str, Any]) -> bool:
    """A mirror Pod: the API copy of a static Pod that the kubelet runs from a file on its node."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return MIRROR_POD_ANNOTATION in annotations


def plan_rewrites(pod: Mapping[str, Any], rules: Sequence[Rule], *, lists: Sequence[str] = CONTAINER_LISTS,
                  keep: Iterable[str] = ()) -> list[Rewrite]:
    """Every image of ``pod`` to rename, in the order of the spec. ``keep`` names containers to leave as they
    are (ephemeral containers that exist already: the apiserver refuses any change to one)."""
    if not rules or is_kubelet_pod(pod):
        return []
    kept = set(keep)
    spec = pod.get("spec") or {}
    rewrites = []
    for field in lists:
        for i, container in enumerate(spec.get(field) or []):
            image, name = container.get("image"), str(container.get("name", ""))
            if not isinstance(image, str) or container.get("imagePullPolicy") == "Never" or name in kept:
                continue
            new = rewrite_image(image, rules)
            if new is not None and new != image:
                rewrites.append(Rewrite(f"/spec/{field}/{i}/image", name, image, new))
    return rewrites


def _escape(key: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def render_patch(pod: Mapping[str, Any], rewrites: Sequence[Rewrite]) -> list[dict[str, Any]]:
    """The JSON patch (RFC 6902) that renames the images and records them in the annotation."""
    if not rewrites:
        return []
    ops: list[dict[str, Any]] = [{"op": "replace", "path": r.where, "value": r.after} for r in rewrites]
    annotations = (pod.get("metadata") or {}).get("annotations")
    record = json.dumps({r.container: f"{r.before} -> {r.after}" for r in rewrites}, sort_keys=True)
    if annotations is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: record}})
    else:
        ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(ANNOTATION)}", "value": record})
    return ops


def apply_patch(body: Any, ops: Sequence[Mapping[str, Any]]) -> None:
    """Apply what :func:`render_patch` and :func:`plan_ephemeral` return (``add`` and ``replace`` of a member or
    an index) to ``body`` in place; kopf's mutation handlers change the body and kopf diffs it."""
    for op in ops:
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in str(op["path"]).split("/")[1:]]
        node: Any = body
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        if isinstance(node, list):
            node[int(last)] = op["value"]
        else:
            node[last] = op["value"]


def plan_pod(pod: Mapping[str, Any], rules: Sequence[Rule]) -> list[dict[str, Any]]:
    """The patch for a Pod being created: every container list, and the annotation."""
    return render_patch(pod, plan_rewrites(pod, rules))


def plan_ephemeral(pod: Mapping[str, Any], old: Mapping[str, Any] | None,
                   rules: Sequence[Rule]) -> list[dict[str, Any]]:
    """The patch for an update of ``pods/ephemeralcontainers`` (``kubectl debug``): only the ephemeral
    containers it adds. The apiserver keeps only that list from such an update, so no annotation."""
    existing = [str(c.get("name", "")) for c in ((old or {}).get("spec") or {}).get("ephemeralContainers") or []]
    rewrites = plan_rewrites(pod, rules, lists=("ephemeralContainers",), keep=existing)
    return [{"op": "replace", "path": r.where, "value": r.after} for r in rewrites]
