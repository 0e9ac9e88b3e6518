"""Quantized models served by `python -m engine serve` (a real subprocess, the official openai client)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from engine.loader import demo_model_path
from tests.engine.test_quant_models import quantize_checkpoint
from tests.engine.test_server import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def serve(model: Path, *extra: str):
    """Start the engine server on `model`; (process, openai client)."""
    port = free_port()
    cmd = [sys.executable, "-m", "engine", "serve", "--model", str(model), "--port", str(port)]
    cmd += [
        "--served-model-name",
        "m",
        "--kv-cache-memory",
        "64MiB",
        "--max-model-len",
        "512",
        "--threads",
        "2",
    ]
    proc = subprocess.Popen(
        [*cmd, *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"engine server exited: {proc.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("engine server did not become healthy in 180 s")
        time.sleep(0.5)
    return proc, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("fmt", ["awq", "gptq", "fp8-channel"])
def test_quantized_checkpoint_is_served(tmp_path, fmt):
    quantized, _ = quantize_checkpoint("llama", fmt, tmp_path)
    prompt = "The quick brown fox jumps over"
    expected = LLM(str(quantized)).generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))[0]
    proc, client = serve(quantized)
    try:
        served = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    finally:
        stop(proc)
    # the same quantized weights and kernels behind the HTTP API as in-process
    assert served.choices[0].text == expected.outputs[0].text
    assert served.usage.completion_tokens == expected.num_output_tokens


def test_smollm2_served_4bit_in_bfloat16():
    proc, client = serve(demo_model_path(), "--dtype", "bfloat16")
    try:
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
    finally:
        stop(proc)
    assert "Paris" in reply.choices[0].message.content
