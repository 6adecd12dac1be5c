"""Proving on this node that pulls use the mirrors: the runtime's own view, and optionally one image resolved.

``verify`` asks the running containerd over its socket (``crigrpc``; ``crictl info`` when that fails and the node
has crictl), reads config.toml and the hosts.toml files it points at, and lets ``effective`` judge each
RegistryMirror. When the RegistryMirror names ``spec.verify.image``, it then sends the ``HEAD`` requests
containerd would send to resolve that image, host after host as containerd falls through, and reports which host
answered: the mirror (in use) or only the upstream (bypassed). The certificate of a host is not checked, for the
reason ``probing`` gives; a 3-second timeout bounds each request.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import tomllib
from collections.abc import Mapping, Sequence

from regmirror_agent import crigrpc, drivers, effective, probing
from regmirror_agent.nodefiles import NodeRoot, UnsafePath
from regmirror_agent.restarting import Host, server_pid
from regmirror_agent.settings import Settings
from regmirror_api import models
from regmirror_api.errors import Refused

DEFAULT_CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"
TIMEOUT = 3.0
#: The runtimes whose own view ``verify`` can read (containerd's CRI plugin over its socket).
VERIFIABLE = tuple(d.name for d in drivers.ALL if d.verifiable)
#: config.toml written less than this before the process started is taken as read by it (``btime`` is whole
#: seconds, so a process start time is known to about a second).
CLOCK_SLACK = 1.5


@dataclasses.dataclass(frozen=True)
class Verification:
    """Does this node's runtime use one RegistryMirror's mirrors? ``in_use`` None: it cannot be told."""

    in_use: bool | None
    reason: str
    """One word for a condition's reason (``effective.IN_USE``, ``NOT_RESTARTED``, ``BYPASSED``...)."""
    message: str
    seconds: float = 0.0
    """How long the verification took, the CRI call and the image's HEAD requests included."""
    answered_by: str = ""
    """The host that served ``spec.verify.image``, when one was asked and one did."""


@dataclasses.dataclass(frozen=True)
class Observed:
    """What was read from the node for the verdicts: the runtime's view (None when it did not answer)."""

    view: effective.RuntimeView | None
    why_not: str
    on_disk: effective.FileSettings
    seconds: float


def containerd_address(settings: Settings, node: NodeRoot) -> str:
    """containerd's socket: the setting, else config.toml's ``[grpc] address``, else the default."""
    if settings.containerd_address:
        return settings.containerd_address
    try:
        doc = tomllib.loads(node.read(settings.config_file) or "")
    except (tomllib.TOMLDecodeError, UnsafePath, OSError):
        return DEFAULT_CONTAINERD_ADDRESS
    grpc = doc.get("grpc")
    return str(grpc.get("address") if isinstance(grpc, dict) and grpc.get("address") else DEFAULT_CONTAINERD_ADDRESS)


def ask_runtime(host: Host, address: str, timeout: float = TIMEOUT) -> crigrpc.CriAnswer:
    """The CRI Status and Version of the running containerd: over its socket, else with the node's crictl."""
    try:
        return crigrpc.ask(address, in_pod=host.nsenter, timeout=timeout)
    except crigrpc.CriError as exc:
        if not host.has("crictl"):
            raise
        return _crictl(host, address, timeout, exc)


def _crictl(host: Host, address: str, timeout: float, first: crigrpc.CriError) -> crigrpc.CriAnswer:
    start = time.monotonic()
    endpoint = ["crictl", "--runtime-endpoint", f"unix://{address}", "--timeout", f"{max(int(timeout), 2)}s"]
    info = host.run([*endpoint, "info"], timeout=timeout + 5)
    if info.returncode != 0:
        raise crigrpc.CriError(f"{first}; crictl info failed too: {(info.stderr or info.stdout).strip()[-300:]}")
    try:
        doc = json.loads(info.stdout)
    except ValueError as exc:
        raise crigrpc.CriError(f"{first}; crictl info printed no JSON: {info.stdout.strip()[:200]!r}") from exc
    conditions = tuple(crigrpc.Condition(str(c.get("type", "")), c.get("status") is True, str(c.get("reason") or ""),
                                         str(c.get("message") or ""))
                       for c in (doc.get("status") or {}).get("conditions") or [] if isinstance(c, dict))
    version = host.run([*endpoint, "version"], timeout=timeout + 5).stdout
    runtime_version = next((line.split(":", 1)[1].strip() for line in version.splitlines()
                            if line.startswith("RuntimeVersion:")), "")
    return crigrpc.CriAnswer(info={k: json.dumps(v) for k, v in doc.items() if k != "status"},
                             conditions=conditions, version=runtime_version, api="crictl info",
                             seconds=time.monotonic() - start)


def process_started(pid: int) -> float | None:
    """When a process started (seconds since the epoch), from ``/proc/<pid>/stat`` and the boot time."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="utf-8") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stale_since(host: Host, address: str, node: NodeRoot, config_file: str) -> str:
    """Why config.toml may not be what the containerd serving ``address`` runs with: it changed after the
    process started. '' when it did not, or when that cannot be told."""
    pid = server_pid(host, address)
    started = process_started(pid) if pid else None
    try:
        changed = os.stat(node.fs_path(config_file)).st_mtime
    except (OSError, UnsafePath):
        return ""
    if started is None or changed <= started + CLOCK_SLACK:
        return ""
    return (f"{config_file} changed at {_when(changed)}, after the containerd process {pid} started at "
            f"{_when(started)}")


def observe(settings: Settings, host: Host, timeout: float = TIMEOUT) -> Observed:
    """The runtime's effective view and config.toml as it is now. Raises ``Refused`` for a config.toml that
    containerd would not read either."""
    start = time.monotonic()
    node = NodeRoot(settings.root)
    config_file = settings.config_file
    try:
        on_disk = effective.file_settings(node.read(config_file), config_file)
    except (UnsafePath, OSError) as exc:
        raise Refused(f"cannot read {config_file}: {exc}") from exc
    address = containerd_address(settings, node)
    try:
        answer = ask_runtime(host, address, timeout)
    except crigrpc.CriError as exc:
        return Observed(None, str(exc), on_disk, time.monotonic() - start)
    conditions = [(c.type, c.status, c.message) for c in answer.conditions]
    stale = ""
    if effective.status_registry(answer.info) is None:  # 2.x: config.toml stands for the process's settings
        stale = stale_since(host, address, node, config_file)
    view = effective.runtime_view(answer.version, answer.info, conditions, on_disk, stale)
    return Observed(view, "", on_disk, time.monotonic() - start)


# --- resolving the verify image ------------------------------------------------------------------------


def head(attempt: effective.Attempt, timeout: float = TIMEOUT, authorization: str = "") -> tuple[int | None, str]:
    """``(HTTP status, '')`` of one ``HEAD``, or ``(None, why)`` when no answer came. ``authorization``: the
    header the mirror's hosts.toml gives containerd for this host (mirror credentials), sent the same way."""
    headers = {"Accept": effective.MANIFEST_ACCEPT, "User-Agent": "regmirror-verify"}
    if authorization:
        headers["Authorization"] = authorization
    try:
        status, _ = probing.request("HEAD", attempt.url, headers, timeout)
    except probing.NO_ANSWER as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return status, ""


def resolve(image: str, mirror: models.RegistryMirror, view: effective.RuntimeView, node: NodeRoot,
            timeout: float = TIMEOUT) -> tuple[effective.Verdict, str]:
    """Resolve ``image`` through the node's runtime configuration: ``(verdict, host that served or '')``."""
    ref = effective.parse_image(image, mirror.registry)
    hosts = effective.find_hosts(view, ref.registry, node)
    answers = []
    # A mirror with credentials gets its header here as containerd gets it from the hosts.toml regmirror wrote.
    logins = {m.url: m.credentials.authorization for m in mirror.mirrors if m.credentials is not None}
    for attempt in effective.plan_resolve(ref, hosts):
        status, error = head(attempt, timeout, logins.get(attempt.host, "") if attempt.mirror else "")
        answers.append((attempt, status, error))
        if status is not None and (200 <= status < 300 or status == 401):
            break
    verdict = effective.judge_answers(image, answers)
    served = next((a.host for a, s, _ in answers if s is not None and 200 <= s < 300), "")
    return verdict, served


def verify(settings: Settings, mirrors: Sequence[models.RegistryMirror], host: Host | None = None, *,
           runtime: str = "containerd", left_out: Mapping[str, frozenset[str]] | None = None,
           timeout: float = TIMEOUT) -> dict[str, Verification]:
    """name -> Verification for each RegistryMirror on this node (from ``settings``: ``root``, ``config_file``,
    ``containerd_address``, ``host``). ``runtime``: the node's, as ``engine.apply`` found it (``Outcome.runtime``).
    ``left_out``: registry -> mirror URLs left out of this node's configuration (not expected in it). Never raises
    for the node's sake: what cannot be read is a verdict of ``None`` with the reason."""
    if runtime not in VERIFIABLE:
        return {m.name: Verification(None, effective.CANNOT_TELL, f"verification is done on "
                                                                  f"{' and '.join(VERIFIABLE)} nodes only, "
                                                                  f"not {runtime}") for m in mirrors}
    host = host or settings.host or Host.detect()
    node = NodeRoot(settings.root)
    try:
        seen = observe(settings, host, timeout)
    except Refused as exc:
        return {m.name: Verification(None, effective.CANNOT_TELL, str(exc)) for m in mirrors}
    results = {}
    for mirror in mirrors:
        start = time.monotonic()
        try:
            verdict = effective.judge(seen.view, seen.why_not, seen.on_disk, mirror, node,
                                      (left_out or {}).get(mirror.registry, frozenset()))
            served = ""
            image = mirror.verify_image
            if image and seen.view is not None and verdict.in_use is not False:
                verdict, served = resolve(image, mirror, seen.view, node, timeout)
        except (UnsafePath, OSError) as exc:
            verdict, served = effective.Verdict(None, effective.CANNOT_TELL, f"cannot read the hosts files: {exc}"), ""
        results[mirror.name] = Verification(verdict.in_use, verdict.reason, verdict.message,
                                            round(seen.seconds + time.monotonic() - start, 3), served)
    return results
