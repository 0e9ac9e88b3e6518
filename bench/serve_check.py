"""End-to-end correctness of `python -m engine serve` on a device, driven by the openai client.

    python bench/serve_check.py --model PATH|--tiny llama [--device cuda] [--json out.json]

Starts the server (float32, so greedy text must equal transformers' exactly; 32-token step budget, so
prompts prefill in chunks while other sequences decode) and checks:
  1. greedy completions equal transformers' greedy generate (float32, the same weights) for each prompt;
  2. a seeded sampled request gives the same text alone, again, and in a crowded batch;
  3. a mixed batch: eight requests sharing a long prefix, sent at once, each answer equal to its answer when
     sent alone, and the prefix served from the cache (usage.prompt_tokens_details.cached_tokens > 0);
  4. a chat completion answers.
Prints one line per check and exits 1 if any failed. Runs on CPU too (--device cpu: what gpu_check.sh
--dry-run does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import start_engine, stop  # noqa: E402

MODEL = "check"
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? The capital of France is",
           "Paged attention reads keys through block tables", "Once upon a time"]
PREFIX = ("A long shared system prompt, so the prefix cache has many full blocks to serve: " * 4).strip()


def reference_texts(path: Path, prompts: list[str], max_tokens: int, device: str) -> list[str]:
    from engine.loader import load_model
    from tests.engine.checkpoints import load_reference

    tokenizer = load_model(path).tokenizer  # the server's own (test_tokenizer.py checks it against transformers')
    reference = load_reference(path).to(device)
    texts = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids], device=device), max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        texts.append(tokenizer.decode(out[0, len(ids):].tolist()))
    del reference
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path)
    source.add_argument("--tiny", choices=["llama", "qwen2", "qwen3"], help="write this tiny test checkpoint")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/serve-check"), help="where --tiny writes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `engine serve` flags")
    args = parser.parse_args()
    if args.tiny:
        from tests.engine.checkpoints import write_tiny_checkpoint

        args.model = write_tiny_checkpoint(args.tiny, args.workdir / args.tiny)
    results: dict = {"model": str(args.model), "device": args.device, "checks": {}}

    def check(name: str, ok: bool, detail) -> None:
        results["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    started = time.perf_counter()
    expected = reference_texts(args.model, PROMPTS, args.max_tokens, args.device)
    process, url = start_engine(
        args.model, "--served-model-name", MODEL, "--device", args.device, "--dtype", "float32",
        "--kv-cache-memory", "512MiB", "--max-num-batched-tokens", "32", "--block-size", "16",
        "--max-model-len", "1024", "--log-level", "warning", *args.extra, timeout=300,
        env={"PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))})  # keeps carried wheels (/tmp/site) importable
    results["startup_s"] = round(time.perf_counter() - started, 1)
    try:
        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        def complete(prompt: str, **params) -> openai.types.Completion:
            params = {"max_tokens": args.max_tokens, "temperature": 0, **params}
            return client.completions.create(model=MODEL, prompt=prompt, extra_body={"ignore_eos": True}, **params)

        got = [complete(p).choices[0].text for p in PROMPTS]
        mismatches = [{"prompt": p, "engine": g, "transformers": e}
                      for p, g, e in zip(PROMPTS, got, expected, strict=True) if g != e]
        check("greedy equals transformers", not mismatches, mismatches or f"{len(PROMPTS)} prompts")

        seeded = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
        alone = complete(PROMPTS[0], **seeded).choices[0].text
        again = complete(PROMPTS[0], **seeded).choices[0].text
        with ThreadPoolExecutor(8) as pool:
            noise = [pool.submit(complete, p, temperature=1.0, max_tokens=20) for p in PROMPTS * 2]
            crowded = pool.submit(complete, PROMPTS[0], **seeded).result().choices[0].text
            for f in noise:
                f.result()
        check("seeded request reproducible", alone == again == crowded,
              {"alone": alone, "again": again, "crowded": crowded})

        suffixes = [f" Question {i}: what comes after {i}?" for i in range(8)]
        solo = [complete(PREFIX + s).choices[0].text for s in suffixes]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda s: complete(PREFIX + s), suffixes))
        cached = [r.usage.prompt_tokens_details.cached_tokens for r in together]
        differ = [i for i, (a, r) in enumerate(zip(solo, together, strict=True)) if a != r.choices[0].text]
        check("mixed batch with prefix hits and chunked prefill equals solo answers", not differ and min(cached) > 0,
              {"differing": differ, "cached_tokens": cached, "prompt_tokens": together[0].usage.prompt_tokens})

        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                              max_tokens=8, temperature=0)
        check("chat completion", chat.choices[0].message.content is not None, chat.usage.completion_tokens)
    finally:
        stop(process, timeout=20)
    results["total_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.exit(0 if all(c["ok"] for c in results["checks"].values()) else 1)


if __name__ == "__main__":
    main()
