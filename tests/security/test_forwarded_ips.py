"""compose.yaml's web command trusts X-Forwarded-For only from FORWARDED_ALLOW_IPS, and publishes the
port on WEB_BIND_ADDRESS (loopback by default). The command is taken from compose.yaml and run for real
(uvicorn, with an app that echoes the client address it decided on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.processes import free_port, stop, wait_until_up

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def web_command(compose: dict, port: int) -> str:
    """The shell line compose runs for `web`, with compose's `$$` unescaped and the echo app on `port`."""
    command = compose["services"]["web"]["command"]
    assert command[:2] == ["sh", "-c"]
    line = command[2].replace("$$", "$")
    assert "maas.asgi:application" in line and "--host 0.0.0.0 --port 8000" in line
    return line.replace("maas.asgi:application", "tests.security.echo_asgi:app").replace(
        "--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {port}")


def client_address_seen(compose, **env) -> str:
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    process = subprocess.Popen(
        ["sh", "-c", web_command(compose, port)], cwd=ROOT,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "WEB_WORKERS": "1", "HOME": os.environ.get("HOME", "/tmp"), **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, process, timeout=30)
        return httpx.get(url, headers={"X-Forwarded-For": "203.0.113.66"}, timeout=5).text
    finally:
        stop(process)


def test_forwarded_for_is_ignored_from_an_untrusted_peer(compose):
    # The proxy is elsewhere: a client connecting directly cannot choose its address.
    assert client_address_seen(compose, FORWARDED_ALLOW_IPS="10.9.9.9") == "127.0.0.1"


def test_forwarded_for_is_honoured_from_the_configured_proxy(compose):
    assert client_address_seen(compose, FORWARDED_ALLOW_IPS="127.0.0.1") == "203.0.113.66"


def test_published_port_binds_to_loopback_unless_configured(compose):
    (published,) = compose["services"]["web"]["ports"]
    assert published == "${WEB_BIND_ADDRESS:-127.0.0.1}:${WEB_PORT:-8000}:8000"
    example = (ROOT / ".env.example").read_text()
    assert "\nFORWARDED_ALLOW_IPS=" in example and "\nWEB_BIND_ADDRESS=" in example
