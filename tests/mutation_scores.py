"""Mutation score per module from mutmut's state in mutants/ (`make mutate` prints it; docs/mutation.md).

Killed counts mutants a test failed on, timeouts (the mutant hung the tests) and segfaults; survivors
are mutants every test passed on, plus those no selected test reaches. Not-yet-checked mutants are left
out of the score and shown apart."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = {"killed", "timeout", "segfault", "caught by type check"}


def scores(root: Path = Path("mutants")) -> list[tuple[str, Counter]]:
    out = []
    for meta in sorted(root.rglob("*.py.meta")):
        statuses = Counter(status_by_exit_code[code] for code in json.loads(meta.read_text())["exit_code_by_key"].values())
        out.append((str(meta.relative_to(root))[: -len(".meta")], statuses))
    return out


def main() -> None:
    print("| module | killed / checked | score | survived | no tests | not checked |")
    print("|---|---|---|---|---|---|")
    for module, s in scores():
        killed = sum(s[k] for k in KILLED)
        checked = sum(s.values()) - s["not checked"]
        score = f"{100 * killed / checked:.1f}%" if checked else "-"
        print(f"| {module} | {killed} / {checked} | {score} | {s['survived']} | {s['no tests']} | {s['not checked']} |")


if __name__ == "__main__":
    sys.exit(main())
