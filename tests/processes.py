"""Real processes for the tests: free ports, waiting for a server to answer, stopping, and the engine server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def sqlite_manage(directory: Path, timeout: float = 300):
    """`manage.py` on embedded defaults (maas.settings, what `make run` uses) against a fresh SQLite file in
    `directory`: a function that runs one command and returns its stdout, failing on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "TEST_DATABASE_NAME"}}
    env.update(DEBUG="1", DATABASE_URL=f"sqlite:///{directory / 'db.sqlite3'}", DJANGO_SETTINGS_MODULE="maas.settings")

    def manage(*args: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return manage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60.0, status: int | None = None) -> None:
    """Until `url` answers (with `status`, if given); fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            answered = httpx.get(url, timeout=1.0).status_code
            if status is None or answered == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up within {timeout}s")


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_engine(model: Path | str, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`python -m engine serve --model MODEL ARGS...` on a free port, once /health answers 200: (process, URL)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--model", str(model), "--port", str(port), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", process, timeout=timeout, status=200)
    except BaseException:
        stop(process)
        raise
    return process, url
