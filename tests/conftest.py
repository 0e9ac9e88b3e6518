"""Suite-wide hooks."""

from __future__ import annotations

import pytest

from tests.ci import CHROMIUM, IN_CI, chromium_missing


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """In CI a browser test without Chromium fails (before its database and server are set up), so a run
    can never go green without the browser; elsewhere the test's own skipif skips it."""
    if IN_CI and item.get_closest_marker("browser") and chromium_missing():
        pytest.fail(f"CI=true and {CHROMIUM} is missing: the browser tests must run in CI "
                    "(`make services` installs Chromium)", pytrace=False)
