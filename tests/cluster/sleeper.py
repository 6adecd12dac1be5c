"""A runnable one-layer image from Debian's busybox-static, for Pods in the test cluster.

No registry.k8s.io and no Docker Hub here, so the nodes' pause image and the workload image are this: busybox
with ``sleep`` as its command. Written as an OCI image layout (``skopeo copy oci:DIR:TAG`` pushes it to a mirror)
and as an archive that ``ctr images import`` loads.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from tests.harness.oci import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    REF_NAME_ANNOTATION,
    _gzip,
    _sha256,
    _write_blob,
)

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "cat", "ls", "echo", "id")


def _layer(marker: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, *, data: bytes = b"", mode: int = 0o644, kind: bytes = tarfile.REGTYPE,
                link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("bin", mode=0o755, kind=tarfile.DIRTYPE)
        add("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)
        for applet in APPLETS:
            add(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        add("tmp", mode=0o1777, kind=tarfile.DIRTYPE)
        add("etc", mode=0o755, kind=tarfile.DIRTYPE)
        add("etc/regmirror-test-image", data=marker.encode())
    return buf.getvalue()


def build_layout(dest: Path, tag: str, marker: str = "") -> Path:
    """An OCI layout at ``dest`` holding the sleeper tagged ``tag``; ``/etc/regmirror-test-image`` says ``marker``."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static (hack/install-deps.sh does)")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layer = _layer(marker or tag)
    layer_digest, layer_size = _write_blob(dest, _gzip(layer))
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Cmd": ["/bin/sleep", "2147483647"], "Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [_sha256(layer)]}}
    config_digest, config_size = _write_blob(dest, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST,
                "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": MEDIA_TYPE_LAYER_GZIP, "digest": layer_digest, "size": layer_size}]}
    manifest_digest, manifest_size = _write_blob(dest, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": MEDIA_TYPE_MANIFEST, "digest": manifest_digest, "size": manifest_size,
        "platform": {"architecture": "amd64", "os": "linux"}, "annotations": {REF_NAME_ANNOTATION: tag}}]}
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def build_archive(dest: Path, name: str) -> Path:
    """``dest`` (a .tar) holding the sleeper as ``name`` (a full reference), for ``ctr images import``."""
    layout = build_layout(dest.with_suffix(".layout"), name)
    with tarfile.open(dest, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)
    shutil.rmtree(layout)
    return dest
