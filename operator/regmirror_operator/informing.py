"""List-then-watch of one kind, in a thread, for the kinds whose count grows with the cluster: Nodes (metadata
only) and RegistryMirrorNodes.

Why not kopf's watching for these: kopf runs a worker per object and re-lists without telling what vanished
meanwhile, so the operator had to list every Node every minute to notice deletions; at 5,000 nodes that is a
cost at rest that grows with the cluster. An informer knows better: a listing is a complete snapshot (what it
lacks is gone), and after it a watch resumes from the last resourceVersion (bookmarks keep it fresh), so at rest
the apiserver only sends bookmarks. Only "410 Gone" lists again. A dead connection is found by TCP keepalive
(``publishing.load_configuration`` turns it on), not by a read timeout: an idle resource gets no bookmarks.

Everything it hears goes to ``sink`` in the order heard: ``sink.listed(kind, {name: object})`` after each
listing and ``sink.event(kind, name, object or None)`` after each change. The sink is called from this thread;
``reconciling`` hands it to the event loop.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from regmirror_operator import publishing

log = logging.getLogger("regmirror.operator")


class Sink(Protocol):
    def listed(self, kind: str, objects: Mapping[str, Mapping[str, Any]]) -> None: ...

    def event(self, kind: str, name: str, obj: Mapping[str, Any] | None) -> None: ...


class Informer:
    def __init__(self, publisher: publishing.Publisher, kind: str, path: str, sink: Sink, *,
                 list_accept: str = "application/json", watch_accept: str = "application/json",
                 watch_seconds: int = 1800, read_timeout: float = 1900.0, max_backoff: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.publisher = publisher
        self.kind = kind
        self.path = path
        self.sink = sink
        self.list_accept = list_accept
        self.watch_accept = watch_accept
        self.watch_seconds = watch_seconds
        self.read_timeout = read_timeout
        self.max_backoff = max_backoff
        self.rand = rand
        self.stop = threading.Event()

    def _list(self) -> str:
        objects, version = self.publisher.list_all(self.path, accept=self.list_accept)
        self.sink.listed(self.kind, {str(o["metadata"]["name"]): o for o in objects})
        return version

    def _watch(self, version: str) -> str | None:
        timeout = int(self.watch_seconds * (0.5 + self.rand() / 2))
        for event in self.publisher.watch(self.path, version, timeout_seconds=timeout,
                                          read_timeout=self.read_timeout, accept=self.watch_accept):
            if self.stop.is_set():
                return version
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                log.info("watch of %s expired (%s): listing again", self.kind, obj.get("message"))
                return None
            meta = obj.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if kind != "BOOKMARK":
                self.sink.event(self.kind, str(meta.get("name", "")), None if kind == "DELETED" else obj)
        return version

    def run(self) -> None:
        backoff = 1.0
        version: str | None = None
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch(version)
                backoff = 1.0
            except publishing.ApiError as exc:
                if exc.status == 410:
                    version = None
                    continue
                self._back_off(backoff, exc)
                backoff = min(backoff * 2, self.max_backoff)
            except Exception as exc:  # a broken connection, a bug: never end the thread
                self._back_off(backoff, exc)
                backoff = min(backoff * 2, self.max_backoff)

    def _back_off(self, backoff: float, exc: Exception) -> None:
        delay = backoff * (0.5 + self.rand())
        log.warning("watching %s failed, retrying in %.1f s: %s", self.kind, delay, exc)
        self.stop.wait(delay)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"informer {self.kind}", daemon=True)
        thread.start()
        return thread
