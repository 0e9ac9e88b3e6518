"""Where the browser tests find Chromium, and whether this run is CI (where a missing browser fails)."""

from __future__ import annotations

import os
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")


def chromium_missing() -> bool:
    return not Path(CHROMIUM).exists()
