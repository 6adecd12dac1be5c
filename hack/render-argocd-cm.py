#!/usr/bin/env python3
"""Write argocd/argocd-cm-patch.yaml: the argocd-cm entry that installs the RegistryMirror health check.

The Lua lives once, in argocd/resource_customizations/regmirror.io/RegistryMirror/health.lua (Argo CD's own
layout, with its health_test.yaml); the ConfigMap entry embeds that file byte for byte, so the two cannot drift
(tests/e2e/test_gitops_health.py runs ``--check``).

Usage: hack/render-argocd-cm.py            rewrite the snippet
       hack/render-argocd-cm.py --check    exit 1 if the snippet is not what health.lua gives
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEALTH_LUA = REPO / "argocd" / "resource_customizations" / "regmirror.io" / "RegistryMirror" / "health.lua"
SNIPPET = REPO / "argocd" / "argocd-cm-patch.yaml"
KEY = "resource.customizations.health.regmirror.io_RegistryMirror"

HEADER = """\
# Installs the Argo CD health check of regmirror.io RegistryMirror objects. Generated from
# argocd/resource_customizations/regmirror.io/RegistryMirror/health.lua by hack/render-argocd-cm.py: edit that
# file, then run the script.
#
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd/argocd-cm-patch.yaml
#
# or list this file under `patches:` of the kustomization that installs Argo CD. Argo CD reads argocd-cm
# without a restart; each RegistryMirror's health then shows in the UI, `argocd app get` and sync waves.
"""


def render(lua: str) -> str:
    if not lua.endswith("\n") or lua.endswith("\n\n"):
        raise SystemExit(f"{HEALTH_LUA} must end with exactly one newline (a YAML `|` block keeps one)")
    body = "".join(f"    {line}\n" if line else "\n" for line in lua.splitlines())
    return (f"{HEADER}apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: argocd-cm\n  namespace: argocd\n"
            f"data:\n  {KEY}: |\n{body}")


def main(argv: list[str]) -> int:
    want = render(HEALTH_LUA.read_text())
    if argv == ["--check"]:
        if not SNIPPET.is_file() or SNIPPET.read_text() != want:
            print(f"{SNIPPET} is not what {HEALTH_LUA} gives: run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    SNIPPET.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
