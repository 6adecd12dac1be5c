"""The agent's mirror credentials: each referenced Secret read once per version the operator publishes.

The operator publishes, for each mirror with ``credentials``, the Secret's name and resourceVersion (never its
data) in ``desired.json``. So the agent GETs a Secret only when the (name, resourceVersion) it holds changes, and
once at start: at rest nothing more reaches the apiserver, whatever the number of nodes, and a rotation costs
each node one GET, which the apiserver answers from its watch cache (``resourceVersion`` = the published one:
"not older than"), not from etcd. A Secret is kept in this process's memory only; what reaches the node is the
header in the mirror's hosts.toml (``credentials``).

A Secret that is missing, unreadable or gives no login for a mirror's host fails that RegistryMirror on this
node, with a message naming the Secret and what is wrong with it (never its content). A failed read other
than "not found" or "forbidden" (the apiserver away) is not remembered: the next reconcile asks again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from regmirror_agent import credentials
from regmirror_agent.kubeapi import ApiError, Client
from regmirror_api import contract, models


@dataclasses.dataclass(frozen=True)
class _Read:
    version: str
    secret: Mapping[str, Any] | None
    problem: str = ""


class SecretReader:
    def __init__(self, client: Client, namespace: str = contract.NAMESPACE) -> None:
        self.client = client
        self.namespace = namespace
        self._held: dict[str, _Read] = {}
        self.reads = 0
        """GETs of Secrets made so far (for tests and metrics: one per published version)."""

    def where(self, name: str) -> str:
        return credentials.source(name, self.namespace)

    def _secret(self, name: str, version: str) -> _Read:
        held = self._held.get(name)
        if held is not None and held.version == version:
            return held
        self.reads += 1
        try:
            # "Not older than" the published version (0: any), so the apiserver answers from its watch cache: a
            # rotation's GET by every node at once costs etcd nothing.
            secret = self.client.get(f"/api/v1/namespaces/{self.namespace}/secrets/{name}",
                                     resourceVersion=version or "0")
        except ApiError as exc:
            if exc.status == 404:
                read = _Read(version, None, f"{self.where(name)} does not exist")
            elif exc.status == 403:
                read = _Read(version, None, f"the agent may not read {self.where(name)} (its Role grants get on "
                                            f"Secrets in {self.namespace} only)")
            else:  # the apiserver away: not remembered, asked again at the next reconcile
                self._held.pop(name, None)
                return _Read(version, None, f"could not read {self.where(name)}: HTTP {exc.status or 'unreachable'}")
            self._held[name] = read
            return read
        read = _Read(version, secret if isinstance(secret, Mapping) else None)
        self._held[name] = read
        return read

    def forget_except(self, names: Sequence[str]) -> None:
        """Drop the Secrets no mirror references any more: nothing kept that is not needed."""
        for name in [n for n in self._held if n not in names]:
            del self._held[name]

    def resolve(self, mirror: models.RegistryMirror) -> models.RegistryMirror:
        """``mirror`` with every mirror's credentials resolved to its header; raises CredentialsProblem naming the
        Secret and what is wrong."""
        def login(m: models.Mirror) -> str:
            assert m.credentials is not None
            name = m.credentials.secret_name
            read = self._secret(name, m.credentials.version)
            if read.secret is None:
                raise credentials.CredentialsProblem(f"mirror {m.url!r}: {read.problem}")
            host = credentials.mirror_host(m.url)
            try:
                return credentials.login_from_secret(read.secret, host, self.where(name)).authorization()
            except credentials.CredentialsProblem as exc:
                raise credentials.CredentialsProblem(f"mirror {m.url!r}: {exc}") from None

        return mirror.with_credentials(lambda m, c: dataclasses.replace(
            c, authorization=login(m), source=self.where(c.secret_name)))
