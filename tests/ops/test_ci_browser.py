"""CI cannot go green without the browser: under CI=true a missing Chromium fails the browser tests and
`.ci/services` exits non-zero when it cannot install it; elsewhere both only warn or skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT

MISSING = "/nonexistent/chromium"


def environment(tmp_path: Path, ci: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CHROMIUM=MISSING, TEST_DATABASE_NAME=f"{os.environ.get('TEST_DATABASE_NAME', 'test')}_ci_browser")
    if ci:
        env["CI"] = "true"
    return env


@pytest.mark.parametrize("ci", [True, False])
def test_browser_tests_fail_in_ci_and_skip_elsewhere_without_chromium(tmp_path, ci):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfs",
         "tests/accounts/test_browser.py", "tests/security/test_csp_browser.py"],
        cwd=ROOT, env=environment(tmp_path, ci), capture_output=True, text=True, timeout=300,
    )
    if ci:
        assert done.returncode == 1, done.stdout[-3000:]
        assert f"CI=true and {MISSING} is missing" in done.stdout and " skipped" not in done.stdout
    else:
        assert done.returncode == 0, done.stdout[-3000:]
        assert " failed" not in done.stdout and " skipped" in done.stdout


@pytest.mark.parametrize("ci", [True, False])
def test_services_script_fails_in_ci_when_chromium_cannot_be_installed(tmp_path, ci):
    """A PATH where apt-get fails as it does without a package mirror (exit status 100)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text("#!/bin/sh\necho 'E: Unable to locate package chromium' >&2\nexit 100\n")
    apt.chmod(0o755)
    env = {**environment(tmp_path, ci), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", ".ci/services"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if ci:
        assert done.returncode == 1
        assert f"chromium could not be installed ({MISSING} is missing)" in done.stderr
    else:
        assert done.returncode == 0, done.stderr
        assert "warning: chromium could not be installed" in done.stderr
