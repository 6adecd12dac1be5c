#!/usr/bin/env bash
# Build the GitOps status checkers of hack/statuscheck into a cache folder: argo-health (an Argo CD Lua health
# check run by gopher-lua the way Argo CD runs it) and kstatus (Flux's status library, cli-utils' kstatus).
#
# Usage: hack/build-status-checkers.sh [OUT_DIR]    (default: .cache/bin)
#
# go.mod and go.sum are committed: the build reads the module proxy (or the module cache) and never edits them.
# tests/harness/statuscheck.py runs this on first use, under a file lock.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/.cache/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
t0=$SECONDS
CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly" \
  go build -C "$here/hack/statuscheck" -trimpath -ldflags=-s -o "$out/" ./cmd/argo-health ./cmd/kstatus
echo "[build-status-checkers] argo-health kstatus: $((SECONDS - t0))s"
