"""How Argo CD and Flux judge an object's health, with their own code: the Go helpers of ``hack/statuscheck``.

- ``argo_health(script, obj)``: an Argo CD Lua health check run by gopher-lua as Argo CD runs it (argo-cd's
  ``util/lua``): ``{"status": "Healthy", "message": "..."}``.
- ``kstatus(obj)``: ``status.Compute`` of ``sigs.k8s.io/cli-utils/pkg/kstatus/status``, what Flux's
  ``wait``/``healthChecks`` use: ``{"status": "Current", "message": "..."}``.

Both are built into ``.cache/bin`` by ``hack/build-status-checkers.sh`` on first use (and again when a source
under ``hack/statuscheck`` is newer than the binaries), under a file lock as the control plane's build is. A
helper that cannot be built is an error, never a skip: these checks are what the GitOps tests are about.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.harness.controlplane import CACHE_BIN, REPO

SOURCES = REPO / "hack" / "statuscheck"
BUILD_SCRIPT = REPO / "hack" / "build-status-checkers.sh"
PROGRAMS = ("argo-health", "kstatus")
#: Seconds the build made by this process took ("build" key absent: the binaries were current); tests print it.
FIGURES: dict[str, float] = {}


class StatusCheckError(RuntimeError):
    """A status checker could not be built or failed on an object."""


def _stale() -> bool:
    newest_source = max(p.stat().st_mtime for p in [*SOURCES.rglob("*"), BUILD_SCRIPT] if p.is_file())
    for name in PROGRAMS:
        binary = CACHE_BIN / name
        if not binary.is_file() or binary.stat().st_mtime < newest_source:
            return True
    return False


def ensure_built() -> Path:
    """The folder holding argo-health and kstatus, built if missing or older than their sources."""
    if not _stale():
        return CACHE_BIN
    CACHE_BIN.mkdir(parents=True, exist_ok=True)
    # One build at a time: a second pytest process waits, then finds the binaries current.
    with open(CACHE_BIN.parent / "build-status-checkers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _stale():
            return CACHE_BIN
        print(f"[statuscheck] building {', '.join(PROGRAMS)} with {BUILD_SCRIPT}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        done = subprocess.run(["bash", str(BUILD_SCRIPT), str(CACHE_BIN)], cwd=REPO, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0 or _stale():
            raise StatusCheckError(f"{BUILD_SCRIPT} exited {done.returncode} (Go and the module proxy, or a "
                                   f"module cache holding hack/statuscheck/go.sum's modules, are needed):\n"
                                   f"{done.stdout}{done.stderr}")
        FIGURES["build"] = time.monotonic() - t0
    return CACHE_BIN


def _run(argv: list[str], obj: Mapping[str, Any]) -> dict[str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(obj, f)
        f.flush()
        done = subprocess.run([*argv, f.name], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise StatusCheckError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    result: dict[str, str] = json.loads(done.stdout)
    return {"status": result.get("status", ""), "message": result.get("message", "")}


def argo_health(script: Path, obj: Mapping[str, Any], *, open_libs: bool = False) -> dict[str, str]:
    """Argo CD's verdict of the Lua health check ``script`` on ``obj``. ``open_libs``: every Lua library open,
    as for Argo CD's built-in checks; without it, only package, base and table, as for an argocd-cm check."""
    argv = [str(ensure_built() / "argo-health"), *(["--open-libs"] if open_libs else []), "--lua", str(script)]
    return _run(argv, obj)


def kstatus(obj: Mapping[str, Any]) -> dict[str, str]:
    """kstatus's verdict on ``obj`` (status: InProgress, Current, Failed, Terminating, NotFound or Unknown)."""
    return _run([str(ensure_built() / "kstatus")], obj)
