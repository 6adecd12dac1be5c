"""Following one named object (the desired-state ConfigMap, the agent's own Node) for as long as the agent runs.

What it costs the apiserver, on purpose: one list of that single object (``fieldSelector=metadata.name=...``)
at start, then one watch from the list's resourceVersion that the server holds open for an hour (jittered, so
5,000 agents do not renew together), with bookmarks. At rest that is all: no periodic list, no GET. A watch
that ends resumes from the last resourceVersion seen (bookmarks keep it fresh); only "410 Gone" (the version
fell out of the watch cache) lists again. Any failure backs off exponentially with jitter, so an apiserver that
comes back is not met by every node at the same instant.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from regmirror_agent.kubeapi import ApiError, Client

log = logging.getLogger("regmirror.agent")

Handler = Callable[[Mapping[str, Any] | None], None]


def jittered(delay: float, rand: Callable[[], float] = random.random) -> float:
    """``delay`` spread over [0.5, 1.5) times itself."""
    return delay * (0.5 + rand())


def retry_delay(exc: ApiError, backoff: float, max_backoff: float,
                rand: Callable[[], float] = random.random) -> tuple[float, float]:
    """How long to wait after ``exc``, and the backoff after that: exponential, with jitter, for every error.
    A 429 (the apiserver's flow control shedding a burst, as when every node reports at once) is no exception:
    retrying 5,000 refused writes every second would only keep the burst going; at least the second it asks for
    (its Retry-After) is waited."""
    delay = jittered(backoff, rand)
    if exc.status == 429:
        delay = max(delay, 1.0)
    return delay, min(backoff * 2, max_backoff)


class ObjectWatch:
    """Calls ``on_change`` with the object (or None when it is absent or deleted) after the first list and after
    every watch event that is not a bookmark; runs in a thread of its own until ``stop`` is set."""

    def __init__(self, client: Client, collection: str, name: str, on_change: Handler, *,
                 stop: threading.Event, list_accept: str = "application/json",
                 watch_accept: str = "application/json", watch_seconds: int = 3600,
                 read_timeout: float = 180.0, max_backoff: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.client = client
        self.collection = collection
        self.name = name
        self.on_change = on_change
        self.stop = stop
        self.list_accept = list_accept
        self.watch_accept = watch_accept
        self.watch_seconds = watch_seconds
        self.read_timeout = read_timeout
        self.max_backoff = max_backoff
        self.rand = rand

    @property
    def _selector(self) -> dict[str, str]:
        return {"fieldSelector": f"metadata.name={self.name}"}

    def _list(self) -> str:
        result = self.client.get(self.collection, accept=self.list_accept, **self._selector)
        items = result.get("items") or []
        self.on_change(items[0] if items else None)
        return str(result["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str | None:
        """Follow from ``version``; the version to resume from, or None when a fresh list is needed."""
        # Half to all of watch_seconds: renewals of many agents spread out instead of arriving together.
        timeout = int(self.watch_seconds * (0.5 + self.rand() / 2))
        params = {**self._selector, "resourceVersion": version}
        for event in self.client.watch(self.collection, params, timeout, read_timeout=self.read_timeout,
                                       accept=self.watch_accept):
            if self.stop.is_set():
                return version
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                log.info("watch of %s %s expired (%s): listing again", self.collection, self.name,
                         obj.get("message"))
                return None
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind != "BOOKMARK":
                self.on_change(None if kind == "DELETED" else obj)
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
            except ApiError as exc:
                if exc.status == 410:
                    version = None
                    continue
                delay, backoff = retry_delay(exc, backoff, self.max_backoff, self.rand)
                log.warning("apiserver: %s; node left as it is, retrying in %.1fs", exc, delay)
                self.stop.wait(delay)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"watch {self.name}", daemon=True)
        thread.start()
        return thread
