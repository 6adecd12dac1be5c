"""Build a tiny, valid OCI image layout in pure Python.

Why: the test machine has no internet, so every image a test pulls must be
pushed into a local registry first.  Building the image here (instead of
shipping a binary tarball or needing a Docker daemon) keeps the fixture
reproducible and lets each image carry a file that names it, so a test can
tell which image it really got.

The layout follows the OCI image-layout spec: ``oci-layout``, ``index.json``
and content-addressed ``blobs/sha256/<hex>``.  ``skopeo copy
oci:DIR:TAG docker://...`` understands it directly.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class OciImage:
    """Digests of one image written into a layout (handy for assertions)."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digest: str
    diff_id: str


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    """Store ``data`` content-addressed; return (digest, size)."""
    digest = _sha256(data)
    blob = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(data)
    return digest, len(data)


def _layer_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar with fixed metadata, so identical content gives identical digests."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name=name.lstrip("/"))
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    # mtime=0 keeps the compressed digest stable across runs.
    return gzip.compress(data, compresslevel=6, mtime=0)


def build_oci_image(
    dest_dir: Path,
    tag: str,
    content: str,
    *,
    architecture: str = "amd64",
    os_name: str = "linux",
    filename: str = "hello.txt",
) -> OciImage:
    """Write one single-layer image tagged ``tag`` into the OCI layout at ``dest_dir``.

    The layer holds ``/<filename>`` with ``content``.  The config's
    ``rootfs.diff_ids`` is the digest of the *uncompressed* tar, as containerd
    checks it when unpacking (a wrong diff_id makes CRI pulls fail).  Calling
    this again on the same directory adds or replaces the tag in ``index.json``,
    so one layout can hold several tags.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    tar_bytes = _layer_tar({filename: content.encode()})
    diff_id = _sha256(tar_bytes)
    layer_digest, layer_size = _write_blob(dest_dir, _gzip(tar_bytes))

    config = {
        "architecture": architecture,
        "os": os_name,
        "config": {"Cmd": ["/bin/true"], "Labels": {"regmirror.test/tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": f"regmirror test harness: {filename}"}],
    }
    config_digest, config_size = _write_blob(
        dest_dir, json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    )

    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MEDIA_TYPE_LAYER_GZIP, "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = _write_blob(
        dest_dir, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    )

    index_path = dest_dir / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    index["manifests"] = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ]
    index["manifests"].append(
        {
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": architecture, "os": os_name},
            "annotations": {REF_NAME_ANNOTATION: tag},
        }
    )
    index_path.write_text(json.dumps(index, indent=2))
    return OciImage(dest_dir, tag, manifest_digest, config_digest, layer_digest, diff_id)


def build_oci_layout(dest_dir: Path, tag: str, content: str) -> Path:
    """Write an image tagged ``tag`` whose ``/hello.txt`` holds ``content``; return the layout dir.

    ``skopeo copy oci:<returned dir>:<tag> docker://...`` pushes it.
    """
    return build_oci_image(dest_dir, tag, content).layout
