"""Read-only views of a node's files, addressed by the node's own absolute paths ("/etc/containerd/...").

Planners take a view instead of touching the disk, so the same planner runs on a real node root and on a
dict in a unit test.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping
from typing import Protocol


class NodeView(Protocol):
    def read(self, path: str) -> str | None:
        """The file's text, or ``None`` when it does not exist."""

    def is_dir(self, path: str) -> bool: ...

    def glob(self, pattern: str) -> list[str]:
        """Node paths matching an absolute glob, sorted."""


class DictView:
    """A node given as ``{path: text}``; directories are implied by the files in them (plus ``dirs``)."""

    def __init__(self, files: Mapping[str, str], dirs: tuple[str, ...] = ()) -> None:
        self.files = dict(files)
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

    def glob(self, pattern: str) -> list[str]:
        return sorted(p for p in self.files if fnmatch.fnmatchcase(p, pattern))
