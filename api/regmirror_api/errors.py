"""The error every consumer of the model catches; kept apart so a caller can catch it without importing the
model (the CLI's fast path imports nothing it does not need)."""

from __future__ import annotations

from collections.abc import Sequence


class InvalidSpec(ValueError):
    """One or more problems in what the user asked for; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))
