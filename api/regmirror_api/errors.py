"""The errors every consumer of regmirror catches; kept apart so a caller can catch them without importing the
model (the CLI's fast path imports nothing it does not need).

One base class, ``RegmirrorError``, so the CLI and the agent catch one thing and anything else is a bug that
deserves its traceback. Two kinds below it, because the caller acts differently on them: ``InvalidSpec``
(what was asked is wrong; the CLI exits 2, nothing on the node was read or changed) and ``Refused`` (the node's
own files or state make the request unsafe or impossible, or the change failed; the CLI exits 1 and every file
is as it was).
"""

from __future__ import annotations

from collections.abc import Sequence


class RegmirrorError(Exception):
    """Anything regmirror refuses or fails at on purpose, with a message meant for the person reading it."""


class InvalidSpec(RegmirrorError, ValueError):
    """One or more problems in what the user asked for; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class Refused(RegmirrorError):
    """The node's files or state make the request unsafe or impossible, or applying it failed; nothing of
    it is left on the node."""
