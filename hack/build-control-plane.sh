#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, etcd, crictl, containerd 2.x and helm from the Go module proxy into a cache folder.
#
# Why a script and not `go install`: k8s.io/kubernetes replaces its k8s.io/* staging modules with local
# paths, so `go install k8s.io/kubernetes/cmd/kube-apiserver@vX` refuses. We make a tiny module that
# requires k8s.io/kubernetes and points every staging module at its published v0.x twin.
#
# Usage: hack/build-control-plane.sh [OUT_DIR]    (default: .cache/bin; skips binaries already there)
#        REGMIRROR_BUILD="crictl" hack/build-control-plane.sh   builds only what is named (crictl etcd kube containerd2 helm)
#
# containerd 2.x (config version 3) goes to OUT_DIR/containerd2/ (`containerd`, `ctr`, and its runc shim, which a
# kubelet node on 2.x runs Pods with), a folder of its own: it must
# never shadow the distribution's containerd 1.x on PATH. Tests put that folder first on PATH only for a 2.x node.
set -euo pipefail

K8S_VERSION=${REGMIRROR_K8S_VERSION:-v1.37.2}
ETCD_VERSION=${REGMIRROR_ETCD_VERSION:-v3.6.16}
CRICTL_VERSION=${REGMIRROR_CRICTL_VERSION:-v1.37.0}
CONTAINERD2_VERSION=${REGMIRROR_CONTAINERD2_VERSION:-v2.3.7}
HELM_VERSION=${REGMIRROR_HELM_VERSION:-v4.3.2}

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/.cache/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$here/.cache/go-build-mods
mkdir -p "$work"
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

stage() { local t0=$SECONDS; "$@"; echo "[build-control-plane] $1 ${*:2}: $((SECONDS - t0))s"; }

build_crictl() {
  [ -x "$out/crictl" ] && return 0
  GOBIN=$out go install "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}

build_helm() {
  [ -x "$out/helm" ] && return 0
  # helm's go.mod has no replace directives: a plain `go install`, version stamped as helm's Makefile does.
  GOBIN=$out go install -trimpath -ldflags "-s -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
}

build_containerd2() {
  local d=$out/containerd2
  [ -x "$d/containerd" ] && [ -x "$d/ctr" ] && [ -x "$d/containerd-shim-runc-v2" ] && return 0
  # Plain `go install`: containerd's go.mod has no replace directives. No cgo, so no btrfs/devmapper/zfs
  # snapshotters (the tests use `native`). Version stamped as containerd's Makefile does (`containerd --version`).
  local pkg=github.com/containerd/containerd/v2
  GOBIN=$d go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags "-s -X $pkg/version.Version=$CONTAINERD2_VERSION" \
    "$pkg/cmd/containerd@$CONTAINERD2_VERSION" "$pkg/cmd/ctr@$CONTAINERD2_VERSION" \
    "$pkg/cmd/containerd-shim-runc-v2@$CONTAINERD2_VERSION"
}

build_etcd() {
  [ -x "$out/etcd" ] && return 0
  local d=$work/etcd
  mkdir -p "$d"
  cat >"$d/main.go" <<'GO'
// Package main runs etcd's own entry point; it exists only so tests can build a pinned etcd.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$d" && rm -f go.mod go.sum && go mod init regmirror.test/etcd >/dev/null 2>&1 &&
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null &&
    go mod tidy >/dev/null && go build -trimpath -ldflags=-s -o "$out/etcd" .)
}

build_kube() {
  local want=()
  for b in kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler; do [ -x "$out/$b" ] || want+=("$b"); done
  [ ${#want[@]} -eq 0 ] && return 0
  local d=$work/kube
  mkdir -p "$d"
  local minor=${K8S_VERSION#v1.}
  local staging_version=v0.$minor
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module regmirror.test/kube"
    echo
    grep -E '^go [0-9]' "$gomod"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # every "k8s.io/x => ./staging/src/k8s.io/x" becomes "k8s.io/x => k8s.io/x v0.MINOR"
    sed -nE "s#^[[:space:]]*(k8s\.io/[A-Za-z0-9._/-]+)[[:space:]]+=>[[:space:]]+\./staging/.*#replace \1 => \1 $staging_version#p" "$gomod"
  } >"$d/go.mod"
  cat >"$d/tools.go" <<'GO'
//go:build tools

// Package tools pins the Kubernetes commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  (cd "$d" && go mod tidy >/dev/null 2>&1 || true)
  for b in "${want[@]}"; do
    # Stamp the version as Kubernetes' own build does, or `kubectl version` cannot parse v0.0.0-master.
    local v=k8s.io/component-base/version
    local major=${K8S_VERSION#v}; major=${major%%.*}
    local minor_only=${minor%%.*}
    local flags="-s -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=$major -X $v.gitMinor=$minor_only -X $v.gitTreeState=clean"
    (cd "$d" && go build -trimpath -ldflags="$flags" -o "$out/$b" "k8s.io/kubernetes/cmd/$b")
  done
}

for what in ${REGMIRROR_BUILD:-crictl etcd kube containerd2 helm}; do
  stage "build_$what"
done
ls -la "$out"
