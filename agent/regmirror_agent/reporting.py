"""Reporting this node's results: its own ``RegistryMirrorNode``, written once per change and never otherwise.

The object holds one entry per RegistryMirror that selects the node, so however many RegistryMirrors change at
once, the node writes one request. It is read once (a GET of this small object) when the agent starts, so a
restarted agent whose node already says the right thing writes nothing; after that the agent knows what the
object holds because it is the only writer. The body is the whole object, sent as a JSON merge patch (lists are
replaced whole) or, the first time, as a create.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from regmirror_agent.kubeapi import ApiError, Client
from regmirror_api import contract

log = logging.getLogger("regmirror.agent")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reporter:
    def __init__(self, client: Client, node: str) -> None:
        self.client = client
        self.node = node
        self.path = f"{contract.NODE_REPORTS_PATH}/{node}"
        self.current: Mapping[str, Any] | None = None
        """The object as this agent last wrote or read it (None: absent)."""
        self.read = False

    def _read(self) -> None:
        try:
            self.current = self.client.get(self.path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            self.current = None
        self.read = True

    def request(self) -> str:
        """The restart slot the object asks for ('' for none)."""
        return contract.restart_request(self.current)

    def previous(self) -> dict[str, dict[str, Any]]:
        """What the object says per RegistryMirror (reads it once, after a start)."""
        if not self.read:
            self._read()
        return contract.parse_node_report(self.current or {})

    def send(self, reports: Sequence[contract.Report], node_uid: str, request: str = "") -> bool:
        """Make the node's object say ``reports`` (and ask for the restart slot ``request``, if any); True if
        that took a write."""
        if not self.read:
            self._read()
        if contract.same_reports(self.current, reports, node_uid, request):
            return False
        body = contract.render_node_report(self.node, node_uid, reports, time=_now(), request=request)
        if self.current is not None:
            try:
                self.current = self.client.merge_patch(self.path, body)
            except ApiError as exc:
                if exc.status != 404:  # deleted meanwhile (by hand, or its Node went): create it again
                    raise
                self.current = self._create(body)
        else:
            self.current = self._create(body)
        log.info("reported node %s: %s %s", self.node, body["status"]["ready"],
                 body["status"]["message"] or body["status"]["generations"] or "no RegistryMirror selects it")
        return True

    def _create(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            result: Mapping[str, Any] = self.client.create(contract.NODE_REPORTS_PATH, body)
        except ApiError as exc:
            if exc.status != 409:  # it exists after all (an earlier attempt's answer was lost)
                raise
            result = self.client.merge_patch(self.path, body)
        return result
