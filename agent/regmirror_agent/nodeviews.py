"""Read-only views of a node's files, addressed by the node's own absolute paths ("/etc/containerd/...").

Planners take a view instead of touching the disk, so the same planner runs on a real node root and on a
dict in a unit test.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping
from typing import Protocol

#: The permission bits of a file regmirror creates (a file with a login in it is narrowed to its owner's).
NEW_FILE_MODE = 0o644


class NodeView(Protocol):
    def read(self, path: str) -> str | None:
        """The file's text, or ``None`` when it does not exist."""

    def is_dir(self, path: str) -> bool: ...

    def mode(self, path: str) -> int | None:
        """The file's permission bits, or ``None`` when it does not exist."""

    def glob(self, pattern: str) -> list[str]:
        """Node paths matching an absolute glob, sorted."""


class DictView:
    """A node given as ``{path: text}``; directories are implied by the files in them (plus ``dirs``). Files
    are 0644 unless ``modes`` says otherwise."""

    def __init__(self, files: Mapping[str, str], dirs: tuple[str, ...] = (),
                 modes: Mapping[str, int] | None = None) -> None:
        self.files = dict(files)
        self.modes = dict(modes or {})
        self.dirs = set(dirs)
        for path in self.files:
            parent = posixpath.dirname(path)
            while parent not in self.dirs:
                self.dirs.add(parent)
                parent = posixpath.dirname(parent)

    def read(self, path: str) -> str | None:
        return self.files.get(path)

    def is_dir(self, path: str) -> bool:
        return path in self.dirs

    def mode(self, path: str) -> int | None:
        return self.modes.get(path, NEW_FILE_MODE) if path in self.files else None

    def glob(self, pattern: str) -> list[str]:
        return sorted(p for p in self.files if fnmatch.fnmatchcase(p, pattern))
