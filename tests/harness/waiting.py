"""Waiting on real components: poll until something holds, and stop a process we started."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 30.0, every: float = 0.2,
             detail: Callable[[], str] | None = None) -> Any:
    """Call ``probe`` until it returns something truthy; return that, or fail naming ``what`` (and with what
    ``detail`` says of the state then: logs, objects)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f"\n{detail()}" if detail else ""))
        time.sleep(every)


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGINT, timeout: float = 20.0) -> str:
    """Ask a process started with ``stdout=PIPE`` to stop (kill it if it will not); return its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""
