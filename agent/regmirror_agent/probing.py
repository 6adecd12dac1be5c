"""Probing mirrors from this node: ``GET <mirror>/v2/`` with a short timeout, many at once.

A mirror is alive when it gives any HTTP answer (401 from a registry that wants a token included: containerd
would go on to authenticate); it is dead when the connection is refused or reset, the TLS handshake fails, or no
answer comes within ``timeout`` seconds (connect, then each read). The path is the one containerd asks for
(RUNTIME-NOTES, containerd's docs/hosts.md): ``/v2`` is appended to the mirror URL unless its path already ends
in ``/v2`` or ``overridePath`` is set (then the URL is used as it is).

The probe asks "does it answer?", not "is it trusted?": it does not verify the mirror's certificate. The agent runs
in its image, whose CAs are not the node's, and a company mirror is often trusted only through a CA installed on
the nodes; verifying here would call such a mirror dead and take it out of every node's configuration, sending
every pull past it. Whether containerd trusts the certificate is containerd's business (and its pull says so).

Probes run in parallel on a small thread pool, so one mirror that hangs costs one timeout, not one per mirror.
Nothing here talks to the apiserver; what the results mean is decided by ``mirrorhealth``.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import logging
import re
import ssl
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode, urlsplit

from regmirror_api import models

log = logging.getLogger("regmirror.agent")
MAX_WORKERS = 8


def probe_path(mirror: models.Mirror) -> str:
    """The path of the probe request: where containerd sends a registry API call's ``/v2/`` prefix."""
    path = urlsplit(mirror.url).path.rstrip("/")
    if mirror.override_path or path.endswith("/v2"):
        return path + "/"
    return path + "/v2/"


def _context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


#: What every probe and login check sends besides its own headers.
PROBE_HEADERS = {"User-Agent": "regmirror-probe", "Accept": "application/json"}
#: What a request may fail with when the other end does not answer as HTTP (refused, reset, timed out, TLS).
NO_ANSWER = (OSError, http.client.HTTPException, ssl.SSLError, ValueError)


def request(method: str, url: str, headers: Mapping[str, str], timeout: float) -> tuple[int, Mapping[str, str]]:
    """``(HTTP status, response headers, lower-cased)`` of one request, the body read (at most 4 KiB) and dropped;
    raises one of ``NO_ANSWER`` when no HTTP answer comes. The certificate is not verified (see above): the agent
    and ``verifying`` ask whether a mirror answers, never whether it is trusted."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme.lower() == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, headers=dict(headers))
        response = conn.getresponse()
        response.read(4096)
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def probe_url(mirror: models.Mirror) -> str:
    """The URL of the probe request (``probe_path`` on the mirror's scheme and host)."""
    parts = urlsplit(mirror.url)
    return f"{parts.scheme}://{parts.netloc}{probe_path(mirror)}"


def probe(mirror: models.Mirror, timeout: float) -> tuple[bool, str]:
    """``(alive, why not)`` for one mirror."""
    try:
        status, _ = request("GET", probe_url(mirror), PROBE_HEADERS, timeout)
    except NO_ANSWER as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, f"HTTP {status}"


def _bearer_realm(challenge: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ``(realm, {"service": ...})``."""
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", "")
    return realm, {k: v for k, v in params.items() if k == "service"}


def check_login(mirror: models.Mirror, timeout: float) -> str:
    """'' when ``mirror`` takes its credentials (or cannot be asked: that is the probe's business), else why not.

    ``GET /v2/`` with the header, as containerd sends it. A registry with Basic auth answers 200 or 401; one with
    token auth (distribution's token server, Harbor) answers 401 with a Bearer challenge whatever the header, so
    then the token endpoint is asked with the same header, as containerd does, and its 401 or 403 is the refusal.
    Messages never hold the header; a mirror whose login is refused is alive: it is not left out."""
    if mirror.credentials is None or not mirror.credentials.authorization:
        return ""
    header = {**PROBE_HEADERS, "Authorization": mirror.credentials.authorization}
    where = mirror.credentials.where
    try:
        status, headers = request("GET", probe_url(mirror), header, timeout)
        challenge = headers.get("www-authenticate", "")
        if status == 401 and challenge.lower().startswith("bearer"):
            realm, params = _bearer_realm(challenge)
            if not realm.lower().startswith(("http://", "https://")):
                return ""
            status, _ = request("GET", realm + ("&" if "?" in realm else "?") + urlencode(params), header, timeout)
    except NO_ANSWER:
        return ""  # does not answer: mirrorhealth's business, not a refused login
    if status in (401, 403):
        return f"the mirror {mirror.url} refused the credentials from {where} (HTTP {status})"
    return ""


def check_logins(mirrors: Iterable[models.Mirror], timeout: float) -> dict[str, str]:
    """url -> why its login is refused, for the mirrors with credentials whose login is refused."""
    found: dict[str, str] = {}
    for mirror in mirrors:
        if mirror.credentials is not None and mirror.url not in found:
            problem = check_login(mirror, timeout)
            if problem:
                found[mirror.url] = problem
    return found


def probe_all(mirrors: Iterable[models.Mirror], timeout: float) -> dict[str, bool]:
    """url -> alive, for each distinct URL, probed in parallel. A probe still running after twice the timeout
    (a name lookup that hangs, which the socket timeout does not cover) counts as dead."""
    unique: dict[str, models.Mirror] = {}
    for mirror in mirrors:
        unique.setdefault(mirror.url, mirror)
    if not unique:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(unique)),
                                                 thread_name_prefix="probe")
    try:
        futures = {url: pool.submit(probe, mirror, timeout) for url, mirror in unique.items()}
        concurrent.futures.wait(futures.values(), timeout=2 * timeout + 1)
        results: dict[str, bool] = {}
        for url, future in futures.items():
            alive, why = future.result() if future.done() else (False, f"no answer within {2 * timeout:g}s")
            results[url] = alive
            if not alive:
                log.debug("mirror %s does not answer: %s", url, why)
        return results
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def describe(results: Mapping[str, bool]) -> str:
    return ", ".join(f"{url} {'answers' if alive else 'DOES NOT ANSWER'}" for url, alive in sorted(results.items()))
