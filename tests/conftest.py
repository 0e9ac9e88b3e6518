"""Suite-wide hooks."""

from __future__ import annotations

import os

import pytest

from tests.ci import CHROMIUM, IN_CI, chromium_missing


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """In CI a browser test without Chromium fails (before its database and server are set up), so a run
    can never go green without the browser; elsewhere the test's own skipif skips it."""
    if IN_CI and item.get_closest_marker("browser") and chromium_missing():
        pytest.fail(f"CI=true and {CHROMIUM} is missing: the browser tests must run in CI "
                    "(`make services` installs Chromium)", pytrace=False)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """Under mutmut (MUTANT_UNDER_TEST set), each run reuses the test database, in which the run before may
    have left committed rows (a timed-out mutant's run is killed before its transactional test flushes):
    start each run from an empty database, or the next run's tests fail on those rows (false kills)."""
    if os.environ.get("MUTANT_UNDER_TEST"):
        from django.core.management import call_command

        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)
