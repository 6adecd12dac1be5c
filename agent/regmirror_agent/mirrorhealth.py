"""Which mirrors this node leaves out because they do not answer: a pure hysteresis over probe results.

The agent probes every mirror URL of the RegistryMirrors applied on its node (``probing``: ``GET <url>/v2/``,
any HTTP answer, 401 included, is alive; refused, reset, timeout or a TLS failure is dead). This module decides,
from those results alone, which mirrors are *out*:

- a mirror goes **out** after ``fails_to_leave`` (2) failed probes in a row, or after a single failed probe when
  that probe is the one made right before the mirror's first apply on this node (so a dead mirror is left out
  from the start instead of being tried by every pull until the next round);
- an out mirror comes **back** only after ``oks_to_return`` (2) successful probes in a row **and** at least
  ``min_out_seconds`` (60) after it went out, so a mirror that answers every other probe does not flap.

What "out" does to the node depends on the mode (``runtimes.containerd``): in hosts mode the mirror is omitted
from its registry's ``hosts.toml`` (read by containerd on every pull: no restart); when every mirror of a
registry is out, the upstream serves, unless the RegistryMirror says ``upstream: Never``, in which case its
mirrors stay. In inline mode (containerd before 1.5, or ``--mode inline``) and on Docker, dropping a mirror would
take a runtime restart or reload, so there the health is only reported and no file changes.

Pure: the clock is passed in, and nothing here touches the network or the disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from regmirror_api import models


@dataclasses.dataclass(frozen=True)
class Rules:
    fails_to_leave: int = 2
    """Failed probes in a row that take a mirror out."""
    oks_to_return: int = 2
    """Successful probes in a row that bring an out mirror back (once ``min_out_seconds`` have passed)."""
    min_out_seconds: float = 60.0
    """The shortest time a mirror stays out."""


@dataclasses.dataclass(frozen=True)
class Health:
    """One mirror URL's standing on this node."""

    out: bool = False
    fails: int = 0
    """Failed probes in a row."""
    oks: int = 0
    """Successful probes in a row."""
    out_since: float | None = None


def observe(health: Health, alive: bool, *, now: float, first: bool = False, rules: Rules = Rules()) -> Health:
    """The standing after one probe. ``first``: the probe made right before the mirror's first apply here."""
    if alive:
        oks = health.oks + 1
        if health.out and oks >= rules.oks_to_return and health.out_since is not None \
                and now - health.out_since >= rules.min_out_seconds:
            return Health()
        return dataclasses.replace(health, fails=0, oks=oks)
    fails = health.fails + 1
    if not health.out and (fails >= rules.fails_to_leave or first):
        return Health(out=True, fails=fails, oks=0, out_since=now)
    return dataclasses.replace(health, fails=fails, oks=0)


class Board:
    """Every probed mirror URL's Health on this node; the agent's one mutable piece of this logic."""

    def __init__(self, rules: Rules = Rules()) -> None:
        self.rules = rules
        self.health: dict[str, Health] = {}

    def known(self, url: str) -> bool:
        return url in self.health

    def record(self, results: Mapping[str, bool], *, now: float, first: Iterable[str] = ()) -> bool:
        """Take one round of probe results (url -> alive); True when the set of out mirrors changed."""
        before = self.out()
        firsts = set(first)
        for url, alive in results.items():
            self.health[url] = observe(self.health.get(url, Health()), alive, now=now, first=url in firsts,
                                       rules=self.rules)
        return self.out() != before

    def forget_except(self, urls: Iterable[str]) -> None:
        """Drop what is known of mirrors no RegistryMirror on this node names any more."""
        keep = set(urls)
        self.health = {u: h for u, h in self.health.items() if u in keep}

    def out(self) -> frozenset[str]:
        return frozenset(u for u, h in self.health.items() if h.out)


def mirror_urls(mirrors: Iterable[models.RegistryMirror]) -> list[str]:
    """Every mirror URL to probe, each once, in order of appearance."""
    return list(dict.fromkeys(m.url for rm in mirrors for m in rm.mirrors))


def left_out(mirror: models.RegistryMirror, out: frozenset[str]) -> tuple[str, ...]:
    """The mirrors of ``mirror`` that are out on this node, in spec order (what its report names)."""
    return tuple(m.url for m in mirror.mirrors if m.url in out)


def kept_mirrors(mirror: models.RegistryMirror, out: frozenset[str]) -> tuple[models.Mirror, ...]:
    """The mirrors a hosts.toml keeps, in spec order: all but the out ones. Empty when every mirror is out and
    the upstream may serve; every mirror when all are out but the upstream must never be contacted
    (``upstream: Never``: a dead mirror is better than a pull from a source the user forbade)."""
    kept = tuple(m for m in mirror.mirrors if m.url not in out)
    if not kept and mirror.upstream == models.UPSTREAM_NEVER:
        return mirror.mirrors
    return kept


def out_by_registry(mirrors: Sequence[models.RegistryMirror], out: frozenset[str]) -> dict[str, frozenset[str]]:
    """registry -> its out mirror URLs, for the registries that have any (what the engine is handed)."""
    result = {}
    for rm in mirrors:
        urls = frozenset(left_out(rm, out))
        if urls:
            result[rm.registry] = urls
    return result
