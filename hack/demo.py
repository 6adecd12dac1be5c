"""regmirror's main job on an embedded default, with no cluster: mirror quay.io and docker.io on a sample node.

It starts a local registry holding quay.io/k8scsi/csi-resizer:v0.5.0 and docker.io/library/busybox:1.36 (built
here, nothing is downloaded), a throwaway containerd whose node root holds the seed's own config.toml (schema 1,
with a Docker Hub mirror written by a `sed` in a node-pool init script), then runs the `regmirror` commands a
bootstrap script would and pulls with crictl. Nothing on this machine's own /etc is touched.

Run it through hack/demo.sh, which installs containerd, the registry and crictl first.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.containerd import ContainerdNode
from tests.harness.registry import Registry

IMAGES = (("quay.io", "k8scsi/csi-resizer", "v0.5.0"), ("docker.io", "library/busybox", "1.36"))


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def regmirror(*args: str) -> int:
    print("$ regmirror " + " ".join(shlex.quote(a) for a in args), flush=True)
    return subprocess.run([sys.executable, "-m", "regmirror_agent.cli", *args], check=False).returncode


def pull(node: ContainerdNode, image: str, *, expect: bool = True) -> bool:
    result = node.crictl_pull(image)
    if result.returncode == 0:
        outcome = "pulled " + result.stdout.strip()
    else:
        outcome = "not pulled (as expected: no mirror yet)" if not expect else "FAILED: " + result.stderr.strip()
    print(f"$ crictl pull {image}\n  -> {outcome}")
    return result.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the sample node folder for a look")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="regmirror-demo-"))
    state = Path(tempfile.mkdtemp(prefix="rmd-", dir="/tmp"))
    registry = Registry(work / "registry")
    node = ContainerdNode(work / "node", state, name="demo-node")
    failed = False
    try:
        step(f"a local registry at {registry.url} plays the mirror")
        for _, repo, tag in IMAGES:
            registry.push(repo, tag, f"{repo}:{tag} served by the regmirror demo mirror\n")
            print(f"  holds {repo}:{tag}")

        step("a sample node: the seed's config.toml (schema 1, a Docker Hub mirror set inline by sed)")
        node.write_config(1, mirrors={"docker.io": ["https://mirror.ccs.tencentyun.com"]})
        node.start()
        print(f"  node root {node.node_root}, containerd socket {node.socket}")
        before = {p: p.read_bytes() for p in node.etc_dir.rglob("*") if p.is_file()}
        for registry_host, repo, tag in IMAGES:
            failed |= pull(node, f"{registry_host}/{repo}:{tag}", expect=False)  # nothing may serve it yet
        print("  (no internet here: nothing can serve these images yet)")

        step("dry run: what regmirror would change")
        mirrors = ["--mirror", f"quay.io={registry.url}", "--mirror", f"docker.io={registry.url}"]
        common = ["--root", str(node.node_root), "--restart", "command:" + node.ctl_command()]
        regmirror("apply", *common, *mirrors, "--dry-run")

        step("apply: hosts.toml per registry, config_path set, inline mirror moved, containerd restarted")
        failed |= regmirror("apply", *common, *mirrors) != 0
        regmirror("show", "--root", str(node.node_root))

        step("pull the original image names through the mirror")
        for registry_host, repo, tag in IMAGES:
            failed |= not pull(node, f"{registry_host}/{repo}:{tag}")

        step("apply again: nothing to do")
        failed |= regmirror("apply", *common, *mirrors) != 0

        step("reset: the node gets exactly its own configuration back")
        failed |= regmirror("reset", *common) != 0
        after = {p: p.read_bytes() for p in node.etc_dir.rglob("*") if p.is_file()}
        same = after == before
        failed |= not same
        print(f"  /etc/containerd byte-identical to before: {same}")
    finally:
        node.stop()
        registry.stop()
        shutil.rmtree(state, ignore_errors=True)
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\ndemo " + ("FAILED" if failed else "succeeded"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
