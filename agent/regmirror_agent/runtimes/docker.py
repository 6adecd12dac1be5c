"""Docker: ``registry-mirrors`` in ``/etc/docker/daemon.json``, the one mirror setting dockerd has.

dockerd mirrors Docker Hub only, with plain ``scheme://host[:port]`` URLs, and reloads ``registry-mirrors`` on
SIGHUP (``systemctl reload docker``), so no restart and no stopped containers
(https://docs.docker.com/reference/cli/dockerd/#configuration-reload-behavior). regmirror owns that one key;
every other key of daemon.json stays as the node had it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from regmirror_agent import credentials, ownership
from regmirror_agent.defaults import DAEMON_JSON, DEFAULT_STATE_DIR, STATE_FILE
from regmirror_agent.nodeviews import NodeView
from regmirror_agent.plans import FileChange, Plan
from regmirror_agent.runtimes import Effective, RuntimeRefused
from regmirror_api import models

RUNTIME = "docker"
KEY = "registry-mirrors"


#: Who takes no mirror credentials, and why: the planner's refusal and the driver's answer.
NO_CREDENTIALS = ("Docker",
                  "its registry-mirrors are bare URLs with no per-mirror credentials (and Docker sends a "
                  "registry's credentials to that registry only); use containerd in hosts mode for this mirror")


class DockerRefused(RuntimeRefused):
    """Docker cannot do what was asked, or daemon.json is unreadable; nothing is changed."""


@dataclasses.dataclass(frozen=True)
class Options:
    daemon_json: str = DAEMON_JSON
    state_path: str = f"{DEFAULT_STATE_DIR}/{STATE_FILE}"


def parse_daemon_json(text: str, path: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DockerRefused(f"{path} is not valid JSON: {exc}; fix it by hand first, regmirror changed nothing") \
            from exc
    if not isinstance(doc, dict):
        raise DockerRefused(f"{path} must hold a JSON object")
    mirrors = doc.get(KEY, [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise DockerRefused(f"{path}: \"{KEY}\" = {json.dumps(mirrors)[:200]} should be a list of URL strings; dockerd "
                            f"would not start with it either. Fix it by hand first, regmirror changed nothing")
    return doc


def render_daemon_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def check_docker_mirrors(desired: Sequence[models.RegistryMirror]) -> list[str]:
    """The mirror URLs for Docker Hub, or refuse what dockerd cannot do (naming it)."""
    problems = []
    urls: list[str] = []
    for mirror in desired:
        if mirror.registry != models.DOCKER_HUB:
            problems.append(f"registry {mirror.registry!r} ({mirror.name}): Docker mirrors only Docker Hub "
                            f"(docker.io); other registries need containerd (or renaming images)")
            continue
        if mirror.upstream == models.UPSTREAM_NEVER:
            problems.append(f"RegistryMirror {mirror.name!r}: upstream: Never cannot be done by Docker: dockerd "
                            f"always falls back to Docker Hub after its registry-mirrors; it needs containerd")
        for m in mirror.mirrors:
            parts = urlsplit(m.url)
            if parts.path not in ("", "/") or m.override_path:
                problems.append(f"mirror {m.url!r}: dockerd accepts only scheme://host[:port] mirror URLs, no path")
            if m.skip_verify or m.ca_bundle or m.capabilities != models.DEFAULT_CAPABILITIES:
                problems.append(f"mirror {m.url!r}: skipVerify, caBundle and capabilities are containerd "
                                f"settings; dockerd's registry-mirrors has none of them")
            urls.append(m.url)
    if problems:
        raise DockerRefused("; ".join(problems))
    return urls


def plan_docker(desired: Sequence[models.RegistryMirror], view: NodeView, state: ownership.State,
                options: Options = Options()) -> Plan:
    models.check_unique_registries(desired)
    credentials.refuse(desired, NO_CREDENTIALS, DockerRefused)
    urls = check_docker_mirrors(desired)
    path = options.daemon_json

    def undo(p: str, current: str | None, original: str | None) -> str | None:
        if current is None:
            return original
        doc = parse_daemon_json(current, p)
        own = parse_daemon_json(original, p) if original is not None else {}
        if doc.get(KEY) == own.get(KEY):
            return current
        if KEY in own:
            doc[KEY] = own[KEY]
        else:
            doc.pop(KEY, None)
        return render_daemon_json(doc)

    def same(p: str, a: str, b: str) -> bool:  # daemon.json is regmirror's in part: a hand edit carries over
        try:
            return p == path and json.loads(a) == json.loads(b)
        except ValueError:
            return False

    current = view.read(path)
    own_text = ownership.pristine(path, current, state, undo, same)
    files: dict[str, str] = {}
    if urls:
        doc = parse_daemon_json(own_text, path) if own_text is not None else {}
        if doc.get(KEY) != urls:
            doc[KEY] = urls
            files[path] = render_daemon_json(doc)
    return ownership.plan_owned_files(runtime=RUNTIME, view=view, state=state, state_path=options.state_path,
                                      desired=files, restart_paths=frozenset({path}), undo=undo, same=same)


def describe(view: NodeView, path: str = DAEMON_JSON) -> tuple[str, list[Effective]]:
    """What dockerd will use: ``registry-mirrors`` (Docker Hub only). Mirrors given as dockerd flags are not
    visible here."""
    text = view.read(path)
    if text is None:
        return f"{path}: absent (dockerd's defaults: no mirrors)", []
    mirrors = parse_daemon_json(text, path).get(KEY) or []
    return f"{path}: present", [Effective(models.DOCKER_HUB, tuple(mirrors), path)] if mirrors else []


def removal_bridge(plan: Plan, path: str = DAEMON_JSON) -> tuple[Plan, Plan] | None:
    """Split a plan that drops ``registry-mirrors`` from daemon.json into (bridge, rest).

    dockerd's reload changes mirrors only when the file sets the key (moby daemon/reload.go:
    ``if conf.IsValueSet("registry-mirrors")``): a file without it leaves the old mirrors running. So the
    bridge writes the node's own file plus ``"registry-mirrors": []`` and is reloaded; the rest then puts the
    node's own bytes back, which needs no reload. The bridge changes no ownership record: were regmirror
    stopped in between, the next run sees a hand edit of its key and undoes it.
    """
    change = next((c for c in plan.changes if c.path == path), None)
    if change is None or change.before is None:
        return None
    if KEY not in parse_daemon_json(change.before, path):
        return None
    after = parse_daemon_json(change.after, path) if change.after is not None else {}
    if KEY in after:
        return None
    bridge_text = render_daemon_json({**after, KEY: []})
    bridge = dataclasses.replace(plan, changes=(FileChange(path, change.before, bridge_text),), mkdirs=(),
                                 rmdirs=(), state_after=plan.state_before, observed=None, restart=True)
    rest = dataclasses.replace(plan, restart=False, changes=tuple(
        FileChange(path, bridge_text, change.after) if c is change else c for c in plan.changes))
    return bridge, rest
