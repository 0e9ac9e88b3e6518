"""`make run` end to end: runplatform on embedded defaults (SQLite, no Redis, no broker, SmolLM2 and
all-MiniLM-L6-v2),
then the operator commands and the official openai client against what it printed."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.processes import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL",
                                                            "SECRET_KEY", "TEST_DATABASE_NAME"}}
    env.update(DEBUG="1", DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", PYTHONUNBUFFERED="1")
    return env


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_ledger_balances(path: Path, requests: int) -> None:
    """The money path on SQLite: every request has its usage record (those answered with tokens), each
    entitlement's tokens_used is the sum of its records and nothing is left reserved."""
    with sqlite3.connect(path) as db:
        records = db.execute("SELECT count(*), sum(status != 'ok' OR prompt_tokens > 0) FROM inference_usagerecord").fetchone()
        assert records == (requests, requests)
        ledger = db.execute(
            "SELECT e.tokens_used, e.tokens_reserved, (SELECT coalesce(sum(u.prompt_tokens + u.completion_tokens), 0)"
            " FROM inference_usagerecord u WHERE u.entitlement_id = e.id) FROM accounts_entitlement e").fetchall()
        assert ledger and all(used == total and reserved == 0 for used, reserved, total in ledger), ledger
        assert db.execute("SELECT count(*) FROM inference_reservation").fetchone() == (0,)


def test_runplatform_serves_chat_on_embedded_defaults_and_restarts_a_failed_engine(tmp_path):
    env = embedded_env(tmp_path)
    env["ENGINE_TEST_FAULT"] = "fatal-after:40"  # the engine breaks on its 40th step (the test hook)
    port, engine_port, embedding_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runplatform", "--port", str(port), "--engine-port", str(engine_port),
         "--embedding-engine-port", str(embedding_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    ready, back = threading.Event(), threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if "Uvicorn running on" in line and f":{port}" in line:
                ready.set()
            if "The engine is back" in line:
                back.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(300), "".join(lines[-40:])
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}/admin/" in output
        # The demo GGUF is served 4-bit: its projections stay packed (~63 MiB) beside the dense embedding.
        resident_mib = float(re.search(r"Weights: ([\d.]+) MiB resident, computing in bfloat16", output).group(1))
        assert resident_mib < 150, resident_mib
        code = re.search(r"demo authorization code .*: (mac-\S+)", output).group(1)

        manage(env, "create_org", "tour", "--owner", "tour@example.com")
        manage(env, "redeem_code", "--org", "tour", code)
        key = re.search(r"sk-\S+", manage(env, "create_api_key", "--org", "tour", "--name", "tour")).group(0)

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["all-minilm-l6-v2", "smollm2-135m-instruct"]
        assert f"embeddings http://127.0.0.1:{embedding_port}" in output
        vectors = client.embeddings.create(model="all-minilm-l6-v2", input=["Paris", "the capital of France"])
        assert [len(d.embedding) for d in vectors.data] == [384, 384] and vectors.usage.prompt_tokens > 4
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        # No fixed text: the fast bfloat16 mode's greedy near-ties fall by the CPU's kernels (on an AMX CPU
        # it opens "L'Étoile", elsewhere "Paris"); the exact mode's text is pinned by the engine's tests.
        answer = reply.choices[0]
        assert answer.message.content.strip() and answer.finish_reason in ("stop", "length")
        assert 0 < reply.usage.completion_tokens <= 12

        # The engine breaks during the next request (its 40th step): that request fails with a server
        # error, the engine exits non-zero, runplatform restarts it, and the next request succeeds.
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=64,
                                           extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "Count to one hundred."}])
        assert failed.value.status_code in (502, 503)
        assert back.wait(120), "".join(lines[-40:])
        output = "".join(lines)
        assert "The engine exited with status 1" in output
        again = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=4,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert again.choices[0].message.content and again.usage.completion_tokens > 0
        assert_ledger_balances(tmp_path / "db.sqlite3", requests=4)

        # SIGTERM (what `make run`'s Ctrl-C or a supervisor sends): a clean exit that takes the engine along.
        process.terminate()
        assert process.wait(timeout=30) == 0, "".join(lines[-40:])
        for port_left in (engine_port, embedding_port):  # both engines went with it
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port_left}/health", timeout=5)
    finally:
        stop(process)
