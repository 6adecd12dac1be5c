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
import ssl
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

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


def probe(mirror: models.Mirror, timeout: float) -> tuple[bool, str]:
    """``(alive, why not)`` for one mirror."""
    parts = urlsplit(mirror.url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    try:
        if parts.scheme.lower() == "https":
            conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=_context())
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
        try:
            conn.request("GET", probe_path(mirror), headers={"User-Agent": "regmirror-probe",
                                                             "Accept": "application/json"})
            response = conn.getresponse()
            response.read(4096)
            return True, f"HTTP {response.status}"
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


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
