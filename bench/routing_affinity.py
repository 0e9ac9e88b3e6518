"""Prefix-cache hit rate, TTFT and load balance of the gateway's replica choice (inference/routing.py):
prefix affinity (bounded-load consistent hashing) vs least loaded vs round robin, against one replica.

Starts R engine replicas (`python -m engine serve` on the SmolLM2 demo GGUF, one torch thread each) and the
gateway (uvicorn, 2 workers: the choice is shared through Redis) on a fresh PostgreSQL database with T
organizations (each its own cache_salt and API key) and one model served by the R replicas. Workload:
each tenant has a long system prompt of its own (~350 tokens) and sends Q requests with different user
questions; all T*Q requests are shuffled and sent streamed, C at a time, max_tokens 2. The engines are
restarted for every strategy (cold caches). Hit rate: prompt tokens served from the prefix cache / prompt
tokens looked up, summed over the replicas (GET /load before and after); load: requests per replica (the
usage records' deployment) and prompt tokens looked up per replica.

    .venv/bin/python bench/routing_affinity.py [--replicas 2] [--tenants 8] [--per-tenant 12] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import free_port, start_engine, stop, wait_until_up  # noqa: E402

DB_NAME = "bench_routing"
WORDS = ["ledger", "invoice", "tenant", "quota", "shipment", "warehouse", "forecast", "refund", "policy", "audit",
         "contract", "supplier", "region", "latency", "cluster", "replica", "gateway", "token", "budget", "schedule"]


def system_prompt(tenant: int) -> str:
    rng = random.Random(tenant)
    rules = [f"Rule {i}: " + " ".join(rng.choice(WORDS) for _ in range(12)) + "." for i in range(22)]
    return f"You are the assistant of company number {tenant}. Follow these rules.\n" + "\n".join(rules)


def environment(redis_url: str, routing: str) -> dict:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "maas.settings",
           "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}", "DATABASE_POOL": "1",
           "REDIS_URL": redis_url, "SECRET_KEY": "bench-only-secret", "API_KEY_HMAC_SECRET": "bench-only-hmac-secret",
           "ALLOWED_HOSTS": "127.0.0.1,localhost", "SECURE_SSL_REDIRECT": "0", "LOG_LEVEL": "WARNING",
           "CELERY_TASK_ALWAYS_EAGER": "1", "GATEWAY_ROUTING": routing, "GATEWAY_CATALOG_CACHE_SECONDS": "1",
           "GATEWAY_REDIS_TIMEOUT": "5"}  # the shared machine is loaded: Redis calls can take a while
    env.pop("TEST_DATABASE_NAME", None)
    return env


def django(env: dict, script: str) -> str:
    result = subprocess.run([sys.executable, "-c", "import django; django.setup()\n" + script], cwd=ROOT, env=env,
                            check=True, capture_output=True, text=True)
    return result.stdout.strip()


def prepare_database(env: dict, tenants: int) -> list[str]:
    import psycopg

    with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    keys = django(env, f"""
from accounts.models import APIKey, Entitlement, Organization
from inference.models import AIModel
AIModel.objects.create(name="smollm2", context_length=2048)
for t in range({tenants}):
    org = Organization.objects.create(name=f"tenant {{t}}", slug=f"tenant-{{t}}", requests_per_minute=1_000_000,
                                      tokens_per_minute=1_000_000_000)
    Entitlement.objects.create(organization=org, token_quota=None)
    print(APIKey.objects.create_key(org, "bench")[1])
""")
    return keys.splitlines()


def set_replicas(env: dict, urls: list[str]) -> None:
    django(env, f"""
from inference.models import AIModel, Deployment, UsageRecord
UsageRecord.objects.all().delete()
model = AIModel.objects.get(name="smollm2")
Deployment.objects.filter(model=model).delete()
for url in {urls!r}:
    Deployment.objects.create(model=model, base_url=url, served_model_name="smollm2")
""")


def requests_per_replica(env: dict) -> dict[str, int]:
    out = django(env, """
import json
from django.db.models import Count
from inference.models import UsageRecord
rows = UsageRecord.objects.filter(status="ok").values("deployment__base_url").annotate(n=Count("id"))
print(json.dumps({r["deployment__base_url"]: r["n"] for r in rows}))
""")
    return json.loads(out.splitlines()[-1])


async def one_request(client: httpx.AsyncClient, gateway: str, key: str, body: dict) -> float:
    started = time.perf_counter()
    async with client.stream("POST", f"{gateway}/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200, await response.aread()
        ttft = None
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data:") and '"content":' in line and '"content":""' not in line:
                ttft = time.perf_counter() - started
    return (ttft or time.perf_counter() - started) * 1000


async def workload(gateway: str, keys: list[str], per_tenant: int, concurrency: int, seed: int) -> list[float]:
    jobs = [(t, q) for t in range(len(keys)) for q in range(per_tenant)]
    random.Random(seed).shuffle(jobs)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def run(t: int, q: int) -> float:
            body = {"model": "smollm2", "max_tokens": 2, "stream": True, "temperature": 0,
                    "messages": [{"role": "system", "content": system_prompt(t)},
                                 {"role": "user", "content": f"Question {q}: which rule mentions {WORDS[q % 20]}?"}]}
            async with gate:
                return await one_request(client, gateway, keys[t], body)
        return await asyncio.gather(*(run(t, q) for t, q in jobs))


def loads(urls: list[str]) -> list[dict]:
    return [httpx.get(f"{u}/load").json() for u in urls]


def run_strategy(args, keys: list[str], routing: str, replicas: int) -> dict:
    from engine.loader import demo_model_path

    env = environment(args.redis_url, routing)
    engines = [start_engine(demo_model_path(), "--served-model-name", "smollm2", "--threads", "1",
                            "--max-model-len", "2048", "--log-level", "warning") for _ in range(replicas)]
    urls = [url for _, url in engines]
    gateway_process = None
    try:
        set_replicas(env, urls)
        subprocess.run(["redis-cli", "-u", args.redis_url, "flushdb"], check=True, capture_output=True)
        port = free_port()
        gateway_process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "maas.asgi:application", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2", "--log-level", "warning", "--no-access-log"], cwd=ROOT, env=env)
        gateway = f"http://127.0.0.1:{port}"
        wait_until_up(f"{gateway}/v1/models", gateway_process)
        before = loads(urls)
        started = time.perf_counter()
        ttfts = asyncio.run(workload(gateway, keys, args.per_tenant, args.concurrency, args.seed))
        wall = time.perf_counter() - started
        after = loads(urls)
        time.sleep(1.5)  # the last usage records
        per_replica = requests_per_replica(env)
    finally:
        if gateway_process is not None:
            stop(gateway_process)
        for process, _ in engines:
            stop(process)
    queries = [a["prefix_cache_queries"] - b["prefix_cache_queries"] for a, b in zip(after, before, strict=True)]
    hits = [a["prefix_cache_hits"] - b["prefix_cache_hits"] for a, b in zip(after, before, strict=True)]
    counts = [per_replica.get(u, 0) for u in urls]
    mean = statistics.mean(counts)
    return {"routing": routing, "replicas": replicas, "hit_rate": sum(hits) / max(sum(queries), 1),
            "requests": counts, "imbalance": (max(counts) - mean) / mean if mean else 0.0,
            "prompt_tokens": queries, "ttft_p50": statistics.median(ttfts),
            "ttft_p90": sorted(ttfts)[int(0.9 * (len(ttfts) - 1))], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--per-tenant", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--strategies", default="single,affinity,least_loaded,round_robin")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    args = parser.parse_args()
    keys = prepare_database(environment(args.redis_url, "affinity"), args.tenants)
    results = []
    for name in args.strategies.split(","):
        routing, replicas = ("affinity", 1) if name == "single" else (name, args.replicas)
        result = run_strategy(args, keys, routing, replicas)
        result["name"] = name
        results.append(result)
        print(json.dumps(result), flush=True)
    baseline = next((r["hit_rate"] for r in results if r["name"] == "single"), None)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"workload: {args.tenants} tenants x {args.per_tenant} requests, concurrency {args.concurrency}")
    print("| strategy | replicas | hit rate | vs one replica | requests per replica | max over mean | "
          "prompt tokens per replica | TTFT p50 / p90 ms | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = f"{r['hit_rate'] / baseline:.0%}" if baseline else "-"
        print(f"| {r['name']} | {r['replicas']} | {r['hit_rate']:.1%} | {ratio} | {r['requests']} | "
              f"+{r['imbalance']:.0%} | {r['prompt_tokens']} | {r['ttft_p50']:.0f} / {r['ttft_p90']:.0f} | "
              f"{r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
