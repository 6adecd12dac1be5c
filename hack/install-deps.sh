#!/usr/bin/env bash
# Install every real component regmirror's demo and tests use, on a fresh Debian 12 machine (as root).
#
#   hack/install-deps.sh            containerd, ctr, docker-registry, skopeo, dockerd, podman (apt);
#                                   regmirror + test deps (pip; bcrypt for the htpasswd of the registry that
#                                   demands mirror credentials);
#                                   debootstrap, busybox-static, containernetworking-plugins (the test cluster's image
#                                   base, pause image and pod network); crictl, etcd, kube-apiserver, kubectl, kubelet,
#                                   kube-controller-manager, kube-scheduler, containerd 2.x (into .cache/bin/containerd2)
#                                   built from the Go module proxy
#   hack/install-deps.sh --node     the same without the control plane (enough for hack/demo.sh)
#   hack/install-deps.sh --with-image   everything, and the regmirror image for the cluster tests (hack/test.sh)
#
# Already-present pieces are skipped; each stage prints what it cost.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

stage() {
  local name=$1 t0=$SECONDS
  shift
  echo "== [install] $name"
  "$@"
  echo "== [install] $name: $((SECONDS - t0))s"
}

apt_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  command -v skopeo >/dev/null || missing+=(skopeo)
  command -v unshare >/dev/null || missing+=(util-linux)
  # Debian's dockerd (tests prove Docker nodes on it); not needed by the demo.
  [ "${1:-}" = "--node" ] || [ -x /usr/bin/dockerd ] || missing+=(docker.io)
  # Debian's podman: reads CRI-O's registries.conf(.d) with CRI-O's library (tests/integration/test_crio_real.py).
  [ "${1:-}" = "--node" ] || command -v podman >/dev/null || missing+=(podman)
  # The image tests' base: a bookworm root filesystem made from Debian's packages (tests/cluster/image.py).
  [ "${1:-}" = "--node" ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
  # The test cluster's nodes: busybox-static is their pause and workload image, Debian's CNI plugins their network.
  [ "${1:-}" = "--node" ] || [ -x /bin/busybox ] || missing+=(busybox-static)
  [ "${1:-}" = "--node" ] || [ -x /usr/lib/cni/ptp ] || missing+=(containernetworking-plugins)
  [ ${#missing[@]} -eq 0 ] && { echo "apt packages present"; return 0; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: docker.io alone would pull in apparmor and needrestart.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_package() {
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[test]"
}

go_binaries() {
  if [ "${1:-}" = "--node" ]; then
    REGMIRROR_BUILD="crictl" hack/build-control-plane.sh
  else
    hack/build-control-plane.sh
  fi
}

# The image of the shipped Dockerfile (tests/cluster/image.py: a debootstrapped Debian base, then `docker build`),
# into .cache/image for the cluster tests. It waits mostly on the network, the Go builds on the CPU: it runs beside
# them, and its cost is printed when it is done.
image_in_background() {
  mkdir -p .cache
  image_t0=$SECONDS
  python3 -m tests.cluster.image >.cache/image-build.log 2>&1 &
  image_pid=$!
}
image_wait() {
  local status=0
  wait "$image_pid" || status=$?
  cat .cache/image-build.log
  echo "== [install] regmirror image (beside the Go builds): $((SECONDS - image_t0))s (exit $status)"
  return $status
}

mode=${1:-}
stage "apt packages (containerd, docker-registry, skopeo, docker.io)" apt_packages "$mode"
stage "python package and test dependencies" python_package
[ "$mode" = "--with-image" ] && image_in_background
stage "Go-built binaries into .cache/bin" go_binaries "$mode"
[ "$mode" = "--with-image" ] && image_wait
exit 0
