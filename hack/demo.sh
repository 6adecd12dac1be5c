#!/usr/bin/env bash
# README's first command: install containerd, a registry and crictl, then run regmirror on a sample node.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
hack/install-deps.sh --node
exec python3 hack/demo.py "$@"
