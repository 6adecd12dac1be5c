"""``regmirror uninstall``: remove every RegistryMirror and wait until every node has its own configuration back.

Why a command: deleting the install deletes the CRD, so every RegistryMirror and the agents at the same moment,
and no agent is left to give the nodes their files back. The mirrors must go first, and the install only once each
agent reports that its node holds nothing of regmirror's any more (its RegistryMirrorNode says ``ready: 0/0``:
every file put back byte for byte, containerd healthy on them). The Helm chart runs this as its pre-delete hook;
with kustomize it is the same as ``kubectl delete registrymirrors --all`` then ``kubectl wait registrymirrornodes
--all --for=jsonpath='{.status.ready}'=0/0`` (README, "Uninstall").

It lists the nodes' reports once and then watches them: one list and one watch, whatever the cluster's size.
A node whose report never gets there (its agent is gone, or it failed to reset) is named when the time is up,
with its report's message, and the command exits 1: ``helm uninstall`` then stops before deleting anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from regmirror_agent.kubeapi import ApiError, Client, load_config
from regmirror_api import contract

MIRRORS = "/apis/regmirror.io/v1alpha1/registrymirrors"
NODES = f"/apis/regmirror.io/v1alpha1/{contract.NODE_PLURAL}"
RESTORED = "0/0"


def pending(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The nodes whose report does not yet say that nothing of regmirror's is left, with what it says instead."""
    out: dict[str, str] = {}
    for name, report in reports.items():
        status = report.get("status") or {}
        if status.get("ready") != RESTORED or status.get("restartRequest"):
            out[name] = f"{status.get('ready', 'no report yet')} {status.get('message') or ''}".strip()
    return out


def run(client: Client, timeout: float, out: Any = sys.stdout) -> int:
    mirrors = client.get(MIRRORS)["items"]
    for mirror in mirrors:
        name = mirror["metadata"]["name"]
        try:
            client.request("DELETE", f"{MIRRORS}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
    print(f"regmirror uninstall: deleted {len(mirrors)} RegistryMirror(s); waiting for every node to report "
          f"its own configuration back (ready {RESTORED})", file=out, flush=True)
    listed = client.get(NODES)
    reports = {o["metadata"]["name"]: o for o in listed["items"]}
    version = listed["metadata"]["resourceVersion"]
    deadline = time.monotonic() + timeout
    while pending(reports):
        left = deadline - time.monotonic()
        if left <= 0:
            for node, says in sorted(pending(reports).items()):
                print(f"regmirror uninstall: node {node} still reports {says}", file=out)
            print(f"regmirror uninstall: {len(pending(reports))} node(s) not restored within {timeout:.0f} s; "
                  f"nothing else was deleted", file=out, flush=True)
            return 1
        try:
            for event in client.watch(NODES, {"resourceVersion": version}, max(1, int(min(left, 300))),
                                      read_timeout=left + 30):
                obj = event.get("object") or {}
                version = obj.get("metadata", {}).get("resourceVersion", version)
                name = obj.get("metadata", {}).get("name")
                if event.get("type") in ("ADDED", "MODIFIED") and name:
                    reports[name] = obj
                elif event.get("type") == "DELETED" and name:
                    reports.pop(name, None)  # its Node is gone, and its files with it
                if not pending(reports):
                    break
        except ApiError as exc:
            if exc.status == 410:  # the watch's history is gone: list again
                listed = client.get(NODES)
                reports = {o["metadata"]["name"]: o for o in listed["items"]}
                version = listed["metadata"]["resourceVersion"]
            else:
                print(f"regmirror uninstall: {exc}; watching again", file=out, flush=True)
                time.sleep(2)
    print(f"regmirror uninstall: all {len(reports)} node(s) have their own configuration back", file=out, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regmirror uninstall", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the nodes (600)")
    parser.add_argument("--kubeconfig", default=None, help="a kubeconfig (default: the Pod's service account)")
    args = parser.parse_args(argv)
    try:
        return run(Client(load_config(args.kubeconfig)), args.timeout)
    except ApiError as exc:
        print(f"regmirror uninstall: {exc}", file=sys.stderr)
        return 1
