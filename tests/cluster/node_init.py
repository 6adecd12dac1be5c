"""PID 1 of one simulated node: its own mount and PID namespaces, its containerd and its kubelet.

Why a namespace per node: the agent runs in a Pod with ``hostPID`` and restarts "the host's" containerd with
``nsenter -t 1 ... systemctl restart containerd``, and mounts the host's ``/`` to edit its files. For two nodes on
one machine to each be a host of their own, each needs its own PID 1 (this program) and its own view of
``/etc/containerd``, ``/var`` and ``/run``; everything else (``/usr``, the network, cgroups) is the machine's.

This process plays systemd's part for the node:

* it mounts the node's folders over the machine's (``binds`` in the config), and a fresh tmpfs on ``/run``;
* it starts containerd, then the kubelet, each detached, with output appended to a log file;
* it serves a unix socket on which ``systemctl`` (a shim bound over ``/usr/bin/systemctl`` in the node) asks it to
  ``restart containerd``. Only containerd's main process is stopped, as systemd's ``KillMode=process`` for
  containerd does: the shims and the containers (the agent's own among them) keep running; the new containerd
  is this process's child, never the caller's, so it lives outside the agent Pod's cgroup like a real unit;
* it reaps every orphan (containerd's shims are re-parented here when containerd restarts);
* on SIGTERM it stops the kubelet and containerd and ends, and the kernel then kills what is left in the node.

Run as ``unshare --mount --pid --fork --mount-proc python3 node_init.py CONFIG.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Service:
    """One long-running program of the node, started detached and stopped by its main pid only."""

    def __init__(self, name: str, spec: dict[str, Any], events: Path) -> None:
        self.name = name
        self.argv: list[str] = spec["argv"]
        self.log = Path(spec["log"])
        self.ready_socket: str | None = spec.get("ready_socket")
        self.events = events
        self.pid: int | None = None
        self.starts = 0
        self.lock = threading.Lock()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            log.write(f"=== node init: start {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ===\n".encode())
            log.flush()
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.pid = proc.pid
        self.starts += 1
        self._event("started")
        if self.ready_socket:
            self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid is not None and not _alive(self.pid):
                raise RuntimeError(f"{self.name} exited while starting; see {self.log}")
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(self.ready_socket or "")
                    return
                except OSError:
                    time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not open {self.ready_socket} within {timeout:.0f} s; see {self.log}")

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.pid
        if pid is None:
            return
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        self.pid = None
        self._event("stopped")

    def _event(self, what: str) -> None:
        with open(self.events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"service": self.name, "event": what, "pid": self.pid, "time": time.time()}) + "\n")


_exited: set[int] = set()


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie reaped by the main loop counts as gone)."""
    if pid in _exited:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _mount(config: dict[str, Any]) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run"], check=True)
    for folder in config.get("run_dirs", []):
        os.makedirs(folder, exist_ok=True)
    for source, target in config["binds"]:
        subprocess.run(["mount", "--bind", source, target], check=True)


def _serve(path: str, services: dict[str, Service]) -> None:
    """``systemctl ACTION UNIT`` from the node, one line each way: the request, then ``ok ...`` or ``error ...``."""
    server = socket.socket(socket.AF_UNIX)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    server.listen(8)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_answer, args=(conn, services), daemon=True).start()


def _answer(conn: socket.socket, services: dict[str, Service]) -> None:
    with conn:
        words = conn.makefile("r").readline().split()
        reply = _act(words, services)
        conn.sendall((reply + "\n").encode())


def _act(words: list[str], services: dict[str, Service]) -> str:
    if len(words) != 2:
        return "error usage: ACTION UNIT"
    action, unit = words[0], words[1].removesuffix(".service")
    service = services.get(unit)
    if service is None:
        return f"error Unit {unit}.service not found."
    with service.lock:
        try:
            if action == "restart":
                service.stop()
                service.start()
            elif action == "stop":
                service.stop()
            elif action == "start":
                if service.pid is None or not _alive(service.pid):
                    service.start()
            elif action == "is-active":
                return "ok active" if service.pid and _alive(service.pid) else "error inactive"
            else:
                return f"error unknown action {action}"
        except RuntimeError as exc:
            return f"error Job for {unit}.service failed: {exc}"
    return f"ok {service.pid}"


def main(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    events = Path(config["events"])
    stopping = threading.Event()

    def on_term(*_: object) -> None:
        stopping.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    _mount(config)
    services = {name: Service(name, spec, events) for name, spec in config["services"].items()}
    try:
        threading.Thread(target=_serve, args=(config["control"], services), daemon=True).start()
        for name in config["start"]:
            services[name].start()
        Path(config["ready"]).write_text(str(os.getpid()))
        while True:
            try:
                pid, _ = os.waitpid(-1, 0)
                _exited.add(pid)
                if len(_exited) > 10000:
                    _exited.clear()
            except ChildProcessError:
                time.sleep(0.2)
    finally:
        for name in reversed(config["start"]):
            try:
                services[name].stop(timeout=5)
            except Exception as exc:
                print(f"node init: stopping {name}: {exc}", file=sys.stderr)
        # Everything else in the node (shims, containers) dies with PID 1; be explicit anyway.
        _signal(-1, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
