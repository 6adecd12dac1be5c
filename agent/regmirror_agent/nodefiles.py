"""The node's files under ``--root``, reached without ever following a symlink.

A node path ("/etc/containerd/certs.d/quay.io/hosts.toml") maps to ``root + path``. No component below the
root may be a symlink: a link planted in ``certs.d`` (or a registry name such as ``../../etc``, which the model
already refuses) must never let a privileged agent write outside the runtime's configuration.
"""

from __future__ import annotations

import os
import posixpath
import stat

from regmirror_api.errors import Refused


class UnsafePath(Refused):
    """A path regmirror would read or write is not a plain file or directory inside the node root."""


def _check_node_path(path: str) -> None:
    if not path.startswith("/") or posixpath.normpath(path) != path or "\x00" in path:
        raise UnsafePath(f"{path!r} is not a normalized absolute path")


class NodeRoot:
    """A node's filesystem seen from regmirror: ``/`` on the node itself, the host mount in the agent."""

    def __init__(self, root: str = "/") -> None:
        self.root = os.path.abspath(root)

    def fs_path(self, path: str) -> str:
        """The path on this machine, after checking that no component below the root is a symlink."""
        _check_node_path(path)
        current = self.root
        for part in path.strip("/").split("/"):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                break
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{self.node_path(current)} is a symlink (to {os.readlink(current)!r}); regmirror "
                                 f"never follows links in the runtime's configuration, so it changed nothing")
        return os.path.join(self.root, path.lstrip("/"))

    def node_path(self, fs_path: str) -> str:
        rel = os.path.relpath(fs_path, self.root)
        return "/" if rel == "." else "/" + rel

    # NodeView
    def read(self, path: str) -> str | None:
        target = self.fs_path(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not hang the read
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory with no path
            os.close(fd)
            raise UnsafePath(f"{path} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise UnsafePath(f"{path} is not UTF-8 text ({exc})") from exc

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.fs_path(path)).st_mode)
        except FileNotFoundError:
            return False

    def mode(self, path: str) -> int | None:
        try:
            return stat.S_IMODE(os.lstat(self.fs_path(path)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def glob(self, pattern: str) -> list[str]:
        import glob  # only drop-ins and `show` need it; the fast path stays small

        _check_node_path(posixpath.normpath(pattern))
        matches = glob.glob(os.path.join(self.root, pattern.lstrip("/")))
        return sorted(self.node_path(m) for m in matches if not os.path.islink(m))
