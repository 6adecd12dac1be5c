"""Make the harness fixtures available when only tests/harness is collected.

Why a hook and not ``pytest_plugins``: pytest refuses ``pytest_plugins`` in a
conftest below the root, and the project's tests/conftest.py already loads
``tests.harness.fixtures`` as a plugin; registering it twice would start two
session registries.  So register it only if nobody did.
"""

from __future__ import annotations

import pytest

PLUGIN = "tests.harness.fixtures"


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
