"""Reporting a node's result to each RegistryMirror: one merge patch on its own status key, only on change.

The patch names only ``status.nodeReports.<node>`` and carries no resourceVersion, so agents never conflict
with each other or with the operator. What was last written is remembered; after an agent restart the object
itself is read first, so a restart alone writes nothing.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping

from regmirror_agent.kubeapi import ApiError, Client
from regmirror_api import contract, models

log = logging.getLogger("regmirror.agent")
STATUS_PATH = f"/apis/{models.API_GROUP}/{models.API_VERSION}/{models.PLURAL}/{{name}}/status"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reporter:
    def __init__(self, client: Client, node: str) -> None:
        self.client = client
        self.node = node
        self.sent: dict[str, contract.Report | None] = {}
        """What this agent last wrote per RegistryMirror (None: its key removed)."""

    def _current(self, name: str) -> Mapping[str, object] | None:
        try:
            obj = self.client.get(STATUS_PATH.format(name=name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        reports = (obj.get("status") or {}).get("nodeReports") or {}
        return reports.get(self.node)

    def report(self, name: str, report: contract.Report | None) -> None:
        """Write this node's report for ``name`` unless the object already says exactly that."""
        if name in self.sent and self.sent[name] == report:
            return
        if name not in self.sent:
            current = self._current(name)
            if (report is None and current is None) or (report and contract.same_report(current, report)):
                self.sent[name] = report
                return
        try:
            self.client.merge_patch(STATUS_PATH.format(name=name), contract.report_patch(self.node, report, _now()))
        except ApiError as exc:
            if exc.status != 404:  # a deleted RegistryMirror needs no report
                raise
        self.sent[name] = report
        log.info("reported %s for %s: %s", self.node, name, report or "removed")

    def forget_others(self, keep: set[str]) -> None:
        """Remove this node's key from RegistryMirrors that no longer select it."""
        for name, report in list(self.sent.items()):
            if name not in keep and report is not None:
                self.report(name, None)
