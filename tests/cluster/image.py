"""The shipped image (the repo's ``Dockerfile``), built for real by a private dockerd, as a tar that containerd imports.

There is no Docker Hub here, so the Dockerfile's default base (``python:3.11-slim``) cannot be pulled. The test
base is made from Debian's own packages instead, which is what the Dockerfile promises to work on:

1. **base**: ``debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm`` from the
   machine's Debian mirror (read from its apt sources), packed into a tarball and ``docker import``-ed with the
   ``PATH`` and ``LANG`` an official image sets (an imported image has no environment, and the Dockerfile's
   ``ENV PATH=/opt/regmirror/bin:$PATH`` would otherwise leave no ``/usr/bin`` on it). The machine's own extra
   CA certificates (``/usr/local/share/ca-certificates``) go into it too: the build stage's ``pip install``
   reaches PyPI through the same egress as this machine, which may re-sign TLS with a CA of its own.
2. **build**: ``docker build --network host --build-arg BASE=<base>`` of the Dockerfile, from a context holding
   exactly what the Dockerfile copies (the repo has no ``.dockerignore``; sending it whole would ship
   ``.cache``). ``--network host`` because the harness dockerd runs with ``--bridge=none``.
3. **save**: ``docker save`` to a tar (Docker's archive format, which ``ctr -n k8s.io images import`` of
   containerd 1.6 and 2.x reads and names ``docker.io/library/regmirror:<tag>``).

Cache: ``.cache/image/`` (``$REGMIRROR_IMAGE_CACHE``). The base is kept as a ``docker save`` of the imported
image (``base-<recipe>.tar``; loading it gives the same image id every time), keyed by the base recipe. Each
built image is kept as ``<key>/regmirror-<tag>.tar`` plus ``.json``, where the key hashes the build context
(Dockerfile, pyproject.toml, README.md, api/, agent/, operator/) and the base recipe; a second session on the
same machine loads the tar into its dockerd instead of building. One ``flock`` on ``.cache/image/lock`` keeps
two processes from building at once (the second waits, then finds the cache). Entries of other keys are
deleted when a new one is written and they have not been used for an hour, so the cache holds about one image
set, not one per commit, while a session still using its tar keeps it.

A second revision of an image (for an "upgrade to a new image" test) is the first one rebuilt with one more
label, ``regmirror.test/revision=N``: the same layers, a new image id, built in about a second.

By hand: ``python3 -m tests.cluster.image [--tag T] [--revision N] [--fresh]`` prints the reference, the sizes
and the per-stage timings (``--fresh`` ignores the cache).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.harness.containerd import REPO_ROOT
from tests.harness.docker import DockerdNode, missing_docker_binaries

IMAGE_NAME = "regmirror"
DEFAULT_TAG = "test"
#: What ``ctr -n k8s.io images import`` names a ``docker save`` of ``regmirror:<tag>``.
CONTAINERD_NAME = "docker.io/library/" + IMAGE_NAME
REVISION_LABEL = "regmirror.test/revision"

CACHE_DIR = Path(os.environ.get("REGMIRROR_IMAGE_CACHE", str(REPO_ROOT / ".cache" / "image")))
#: What the Dockerfile copies into the build (its ``COPY`` lines), and so what the cache key hashes.
CONTEXT_FILES = ("Dockerfile", "pyproject.toml", "README.md")
CONTEXT_DIRS = ("api", "agent", "operator")
_SKIP_PARTS = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")

# The base recipe. Bump RECIPE_VERSION when the way the base is made changes (it is part of the key).
RECIPE_VERSION = 1
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
)
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

BUILD_TIMEOUT = 1800.0
PRUNE_AFTER = 3600.0


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    """One image of the shipped Dockerfile, loaded in a dockerd and saved as a tar."""

    reference: str
    """``regmirror:<tag>`` as dockerd knows it (containerd names it ``docker.io/library/regmirror:<tag>``)."""
    tar: Path
    """``docker save`` of the image: what ``ctr -n k8s.io images import`` takes."""
    image_id: str
    """The image's config digest (``sha256:...``), as ``docker image inspect`` gives ``Id``."""
    size: int
    """Bytes of the unpacked image (``docker image inspect`` ``Size``)."""
    tar_size: int
    """Bytes of the tar."""
    base: str
    """The base image it was built on (``--build-arg BASE=``)."""
    revision: int
    """1 for the Dockerfile as shipped; N for the same image with the label ``regmirror.test/revision=N``."""
    timings: dict[str, float]
    """Seconds per stage of the build that made it (``base``, ``build``, ``save``), and ``load`` when reused."""
    cached: bool
    """True when this session loaded a tar an earlier build left in the cache."""

    @property
    def containerd_reference(self) -> str:
        return f"{CONTAINERD_NAME}:{self.reference.split(':', 1)[1]}"

    def describe(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        return (f"{self.reference} {self.image_id} size {self.size / 1e6:.1f} MB (docker image inspect), "
                f"tar {self.tar_size / 1e6:.1f} MB, base {self.base}, "
                f"{'from cache' if self.cached else 'built'}; {stages}")


@dataclasses.dataclass(frozen=True)
class BaseRecipe:
    """How the test base is made: the inputs of debootstrap, the CAs added, the image's environment."""

    mirror: str
    suite: str = SUITE
    packages: tuple[str, ...] = BASE_PACKAGES
    env: tuple[str, ...] = BASE_ENV
    extra_cas: tuple[tuple[str, str], ...] = ()
    version: int = RECIPE_VERSION

    def key(self) -> str:
        doc = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    @property
    def reference(self) -> str:
        return f"regmirror-test-base:{self.suite}-{self.key()}"


class ImageBuildError(RuntimeError):
    """A stage of making the image failed; the message names the command and ends with its output."""


def log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


class Timings(dict[str, float]):
    """Stage durations, printed to stderr as each is taken."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self[name] = round(time.monotonic() - t0, 2)
            log(f"{name}: {self[name]:.1f}s")


# ---- inputs -----------------------------------------------------------------------------------------------------
def _apt_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every ``deb`` source in the machine's apt configuration (one-line and deb822 forms)."""
    found: list[tuple[str, list[str]]] = []
    apt = Path("/etc/apt")
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], [words[2]]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        name, _, value = line.partition(":")
                        fields[name.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split():
                    found.extend((uri, fields.get("suites", "").split()) for uri in fields.get("uris", "").split())
    return found


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian archive the machine installs ``suite`` from (``$REGMIRROR_DEBIAN_MIRROR`` wins)."""
    if os.environ.get("REGMIRROR_DEBIAN_MIRROR"):
        return os.environ["REGMIRROR_DEBIAN_MIRROR"]
    for uri, suites in _apt_sources():
        if suite in suites and "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def base_recipe() -> BaseRecipe:
    cas = tuple(sorted((p.name, p.read_text()) for p in EXTRA_CA_DIR.glob("*.crt"))) if EXTRA_CA_DIR.is_dir() else ()
    return BaseRecipe(mirror=debian_mirror(), extra_cas=cas)


def _context_files() -> list[Path]:
    """Paths (relative to the repo) of everything the Dockerfile's COPY lines take, sorted."""
    files = [Path(name) for name in CONTEXT_FILES]
    for folder in CONTEXT_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            rel = path.relative_to(REPO_ROOT)
            if path.is_file() and not any(part in _SKIP_PARTS or part.endswith(".egg-info") for part in rel.parts):
                files.append(rel)
    return files


def source_key(recipe: BaseRecipe) -> str:
    """Hash of the build context (names and bytes) and the base recipe: one cache entry per distinct image."""
    digest = hashlib.sha256(f"recipe {recipe.key()}\n".encode())
    for rel in _context_files():
        data = (REPO_ROOT / rel).read_bytes()
        digest.update(f"{rel} {len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def _stage_context(dest: Path) -> None:
    for rel in _context_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, target)


# ---- commands ---------------------------------------------------------------------------------------------------
def _run(argv: list[str], *, timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                             check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what}: {' '.join(argv)} timed out after {timeout}s") from exc
    if res.returncode != 0:
        raise ImageBuildError(f"{what}: {' '.join(argv)} exited {res.returncode}:\n{_tail(res.stdout + res.stderr)}")
    return res


def _docker(node: DockerdNode, *args: str, timeout: float = 300.0, what: str) -> subprocess.CompletedProcess[str]:
    res = node.docker(*args, timeout=timeout)
    if res.returncode != 0:
        raise ImageBuildError(f"{what}: docker {' '.join(args)} exited {res.returncode}:\n"
                              f"{_tail(res.stdout + res.stderr)}\n--- dockerd log ---\n{node.log_tail(15)}")
    return res


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _inspect(node: DockerdNode, reference: str) -> tuple[str, int]:
    doc = node.image_inspect(reference)
    if doc is None:
        raise ImageBuildError(f"{reference} is not in the dockerd of {node.run_dir}")
    return str(doc["Id"]), int(doc["Size"])


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building into {cache}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- stages -----------------------------------------------------------------------------------------------------
def make_base_rootfs(recipe: BaseRecipe, tarball: Path, workdir: Path) -> None:
    """debootstrap the recipe into ``workdir/rootfs`` and pack it into ``tarball`` (numeric owners, no /dev)."""
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap not found: apt-get install --no-install-recommends debootstrap "
                              "(hack/install-deps.sh installs it)")
    rootfs = workdir / "rootfs"
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}", recipe.suite, str(rootfs),
          recipe.mirror], timeout=BUILD_TIMEOUT, what="debootstrap")
    if recipe.extra_cas:
        for name, text in recipe.extra_cas:
            (rootfs / EXTRA_CA_DIR.relative_to("/") / name).write_text(text)
        _run(["chroot", str(rootfs), "/usr/sbin/update-ca-certificates"], timeout=120,
             what="update-ca-certificates in the base")
    # What an image needs no copy of: downloaded .debs, package lists, logs.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*", "var/log/*.log"):
        for path in rootfs.glob(pattern):
            if path.is_file():
                path.unlink()
    _run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "--exclude=./dev/*", "--exclude=./proc/*",
          "--exclude=./sys/*", "-cf", str(tarball), "."], timeout=600, what="tar of the base")
    shutil.rmtree(rootfs)


def ensure_base(node: DockerdNode, recipe: BaseRecipe, cache: Path, timings: Timings) -> str:
    """Have the base image in ``node``: loaded from the cache, else debootstrapped, imported and cached."""
    reference = recipe.reference
    if node.image_inspect(reference) is not None:
        return reference
    saved = cache / f"base-{recipe.key()}.tar"
    if saved.exists():
        with timings.stage("base load"):
            _docker(node, "load", "--input", str(saved), what="load the cached base")
        return reference
    with timings.stage("base"), tempfile.TemporaryDirectory(prefix="base-", dir=cache) as tmp:
        rootfs_tar = Path(tmp) / "rootfs.tar"
        make_base_rootfs(recipe, rootfs_tar, Path(tmp))
        changes = [a for env in recipe.env for a in ("--change", f"ENV {env}")]
        _docker(node, "import", *changes, "--change", 'CMD ["/bin/sh"]', str(rootfs_tar), reference,
                timeout=600, what="import the base")
        partial = Path(tmp) / "base.tar"
        _docker(node, "save", "--output", str(partial), reference, timeout=600, what="save the base")
        for old in cache.glob("base-*.tar"):
            old.unlink()
        os.replace(partial, saved)
    return reference


def build(node: DockerdNode, *, tag: str, base: str, labels: dict[str, str] | None = None,
          log_path: Path | None = None) -> str:
    """``docker build`` the shipped Dockerfile on ``base`` as ``regmirror:<tag>``; returns the reference."""
    reference = f"{IMAGE_NAME}:{tag}"
    with tempfile.TemporaryDirectory(prefix="context-") as tmp:
        _stage_context(Path(tmp))
        label_args = [a for k, v in sorted((labels or {}).items()) for a in ("--label", f"{k}={v}")]
        res = _docker(node, "build", "--network", "host", "--build-arg", f"BASE={base}", *label_args,
                      "--tag", reference, tmp, timeout=BUILD_TIMEOUT, what=f"build {reference}")
    if log_path is not None:
        log_path.write_text(res.stdout + res.stderr)
    return reference


def save(node: DockerdNode, reference: str, tar: Path) -> None:
    """``docker save`` into ``tar`` (written beside it, then renamed: a reader never sees half a tar)."""
    partial = tar.with_name(tar.name + ".partial")
    _docker(node, "save", "--output", str(partial), reference, timeout=600, what=f"save {reference}")
    os.replace(partial, tar)


def _write_meta(image: BuiltImage, path: Path) -> None:
    doc = {**dataclasses.asdict(image), "tar": image.tar.name}
    doc.pop("cached")
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _read_meta(path: Path) -> BuiltImage | None:
    try:
        doc = json.loads(path.read_text())
        tar = path.with_name(doc.pop("tar"))
        image = BuiltImage(tar=tar, cached=True, **doc)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return image if tar.exists() and tar.stat().st_size == image.tar_size else None


def ensure_image(node: DockerdNode, *, tag: str = DEFAULT_TAG, revision: int = 1, fresh: bool = False,
                 cache: Path = CACHE_DIR) -> BuiltImage:
    """``regmirror:<tag>`` of the shipped Dockerfile in ``node`` and as a tar: from the cache, else built.

    ``revision`` 1 is the Dockerfile as shipped. A higher revision is ``regmirror:<DEFAULT_TAG>`` (made first
    if needed) rebuilt with the label ``regmirror.test/revision=<revision>``: the same layers, a new image id.
    ``fresh`` builds even when the cache holds the image (and replaces the cached copy).
    """
    if revision < 1:
        raise ValueError(f"revision {revision}: expected 1 (the Dockerfile as shipped) or more")
    if revision > 1 and tag == DEFAULT_TAG:
        raise ValueError(f"tag {tag!r} is revision 1's; give revision {revision} a tag of its own")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        raise ValueError(f"tag {tag!r} is not a Docker tag (letters, digits, '_', '.', '-'; at most 128)")
    recipe = base_recipe()
    with _locked(cache):
        return _ensure(node, tag=tag, revision=revision, fresh=fresh, cache=cache, recipe=recipe)


def _ensure(node: DockerdNode, *, tag: str, revision: int, fresh: bool, cache: Path,
            recipe: BaseRecipe) -> BuiltImage:
    """ensure_image with the cache lock held."""
    key = source_key(recipe)
    entry = cache / key
    meta = entry / f"{IMAGE_NAME}-{tag}.json"
    cached = None if fresh else _read_meta(meta)
    if entry.is_dir():
        os.utime(entry)  # in use: _prune leaves it alone
    if cached is not None and cached.revision == revision:
        present = node.image_inspect(cached.reference)
        if present is not None and present["Id"] == cached.image_id:
            return cached
        timings = Timings()
        with timings.stage("load"):
            _docker(node, "load", "--input", str(cached.tar), what=f"load {cached.tar}")
        image_id, _ = _inspect(node, cached.reference)
        if image_id != cached.image_id:
            raise ImageBuildError(f"{cached.tar} loaded as {image_id}, its record says {cached.image_id}")
        return dataclasses.replace(cached, timings={**cached.timings, **timings})
    _prune(cache, keep=key)
    entry.mkdir(parents=True, exist_ok=True)
    timings = Timings()
    if revision == 1:
        base = ensure_base(node, recipe, cache, timings)
        with timings.stage("build"):
            reference = build(node, tag=tag, base=base, log_path=entry / f"{IMAGE_NAME}-{tag}.build.log")
    else:
        # Not fresh: revision 1 from this very build context is what the label goes on, cached or not.
        first = _ensure(node, tag=DEFAULT_TAG, revision=1, fresh=False, cache=cache, recipe=recipe)
        base = first.base
        with timings.stage("build"):
            reference = relabel(node, first.reference, tag=tag, revision=revision)
    tar = entry / f"{IMAGE_NAME}-{tag}.tar"
    with timings.stage("save"):
        save(node, reference, tar)
    image_id, size = _inspect(node, reference)
    image = BuiltImage(reference=reference, tar=tar, image_id=image_id, size=size, tar_size=tar.stat().st_size,
                       base=base, revision=revision, timings=dict(timings), cached=False)
    _write_meta(image, meta)
    return image


def _prune(cache: Path, *, keep: str) -> None:
    """Delete other source trees' images once nobody used them for PRUNE_AFTER seconds.

    Not at once: other sessions on this machine may be using an entry of a slightly different tree (a shared
    checkout changes under them) and still import its tar.
    """
    now = time.time()
    for old in cache.iterdir():
        if (old.is_dir() and re.fullmatch(r"[0-9a-f]{16}", old.name) and old.name != keep
                and now - old.stat().st_mtime > PRUNE_AFTER):
            shutil.rmtree(old, ignore_errors=True)


def relabel(node: DockerdNode, source: str, *, tag: str, revision: int) -> str:
    """``regmirror:<tag>``: ``source`` plus the label ``regmirror.test/revision=<revision>`` (a new image id)."""
    reference = f"{IMAGE_NAME}:{tag}"
    with tempfile.TemporaryDirectory(prefix="relabel-") as tmp:
        (Path(tmp) / "Dockerfile").write_text(f"FROM {source}\n")
        _docker(node, "build", "--network", "none", "--label", f"{REVISION_LABEL}={revision}", "--tag", reference,
                tmp, timeout=300, what=f"build {reference}")
    return reference


def start_dockerd(workdir: Path) -> DockerdNode:
    """A private dockerd (tests/harness/docker.py) to build in, for the command line."""
    missing = missing_docker_binaries()
    if missing:
        raise ImageBuildError(f"missing for a real dockerd: {', '.join(missing)} "
                              "(apt-get install --no-install-recommends docker.io)")
    node = DockerdNode(workdir / "node", name="image-builder")
    node.write_daemon_json({})
    node.start()
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.cluster.image", description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"tag of regmirror:<tag> (default {DEFAULT_TAG})")
    parser.add_argument("--revision", type=int, default=1,
                        help=f"1: the Dockerfile as shipped; N>1: regmirror:{DEFAULT_TAG} plus the label "
                             f"{REVISION_LABEL}=N")
    parser.add_argument("--fresh", action="store_true", help="build even if the cache holds the image")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="regmirror-image-") as tmp:
        node = start_dockerd(Path(tmp))
        try:
            image = ensure_image(node, tag=args.tag, revision=args.revision, fresh=args.fresh)
        finally:
            node.close()
    print(f"reference: {image.reference} (containerd: {image.containerd_reference})")
    print(f"image id:  {image.image_id}")
    print(f"size:      {image.size} bytes (docker image inspect), tar {image.tar_size} bytes")
    print(f"tar:       {image.tar}")
    print(f"base:      {image.base}")
    print(f"timings:   {', '.join(f'{k} {v:.1f}s' for k, v in image.timings.items())}"
          f"{' (of the build that made it; loaded from the cache)' if image.cached else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
