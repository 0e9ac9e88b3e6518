"""`python -m engine serve --tensor-parallel-size 2` on the CPU (gloo): the official openai client gets the
greedy tokens one rank gives, and when a worker rank dies the request in flight answers 503 and the server
exits non-zero like any engine failure (engine/failures.py), without hanging.

The worker is killed with SIGKILL: the one fault a real worker cannot be made to have on demand otherwise.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine.prompts import PromptBuilder
from tests.engine.checkpoints import tiny_checkpoint
from tests.processes import start_engine, stop

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me a story about a dragon and a knight."}]


@pytest.fixture(scope="module")
def server():
    process, url = start_engine(tiny_checkpoint("llama"), "--served-model-name", "m", "--tensor-parallel-size", "2",
                                "--dtype", "float32", "--threads", "1", "--kv-cache-memory", "16MiB", "--max-model-len", "512",
                                "--fatal-exit-delay", "1", "--log-level", "warning")
    yield process, url
    if process.poll() is None:
        stop(process)


def worker_pids(parent: int) -> list[int]:
    """The server's spawned worker processes (children running multiprocessing's spawn_main)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_two_ranks_serve_the_greedy_tokens_of_one(server):
    _, url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
    threads = torch.get_num_threads()
    try:
        llm = LLM(str(tiny_checkpoint("llama")), num_kv_blocks=64, torch_threads=1)  # one rank, as the ranks run
        ids = PromptBuilder(llm.tokenizer).chat_ids(MESSAGES, None, None)
        expected = llm.generate(ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    finally:
        torch.set_num_threads(threads)
    assert reply.usage.completion_tokens == 16 == len(expected.outputs[0].token_ids)
    assert reply.choices[0].message.content == expected.outputs[0].text


def test_a_dead_worker_fails_the_request_in_flight_with_503_and_the_server_exits(server):
    process, url = server
    (worker,) = worker_pids(process.pid)
    answer: dict = {}

    def long_request():
        answer["response"] = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True})

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)  # generating: 400 tokens take several seconds here
    assert thread.is_alive()
    killed = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the request hung after the worker died"
    response = answer["response"]
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert process.wait(timeout=20) == 1
    print(f"worker killed -> 503 and exit 1 in {time.monotonic() - killed:.1f} s")
