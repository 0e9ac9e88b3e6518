"""CPU per request of the gateway's money path alone (admission query, rate-limit decision in process,
hold, settlement with its usage record) on the asyncio PostgreSQL pool, in one process, no HTTP, so
that two versions compare on a busy machine (process CPU time varies less with load than latency):

    .venv/bin/python bench/money_path.py ROOT [--requests 2000]

ROOT: the checkout whose code is measured (e.g. a `git worktree` of the previous commit, run alternately
with this one). It recreates the database bench_money_path and migrates it with ROOT's migrations."""
import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import psycopg

parser = argparse.ArgumentParser()
parser.add_argument("root")
parser.add_argument("--requests", type=int, default=2000)
args = parser.parse_args()
ROOT = os.path.abspath(args.root)
DB = "bench_money_path"
env = {**os.environ, "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB}", "DEBUG": "1",
       "DJANGO_SETTINGS_MODULE": "maas.settings", "LOG_LEVEL": "ERROR"}
env.pop("REDIS_URL", None)
os.environ.clear()
os.environ.update(env)
with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
    conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    conn.execute(f"CREATE DATABASE {DB}")
subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
sys.path.insert(0, ROOT)
os.chdir(ROOT)
import django  # noqa: E402

django.setup()
from accounts.models import APIKey, Entitlement, Organization  # noqa: E402
from inference import quotas  # noqa: E402
from inference.models import AIModel, Deployment, UsageRecord  # noqa: E402
from inference.ratelimit import RateLimiter  # noqa: E402
from inference.validation import parse_chat  # noqa: E402

org = Organization.objects.create(name="Bench", slug="bench")
Entitlement.objects.create(organization=org, token_quota=None)
key, raw = APIKey.objects.create_key(org, "bench")
model = AIModel.objects.create(name="bench-model", price_input_per_million=1, price_output_per_million=2)
Deployment.objects.create(model=model, base_url="http://127.0.0.1:9")
limiter = RateLimiter("", "refuse", 0.5)
BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}


async def one(i):
    admission = await quotas.admit_request_async(raw, parse_chat(BODY), None, f"req_{i}", limiter)
    record = UsageRecord(organization_id=org.pk, api_key_id=key.pk, model_name="bench-model", endpoint="chat/completions",
                         prompt_tokens=12, completion_tokens=8, cost=model.cost(12, 0, 8), status="ok", http_status=200,
                         latency_ms=1.0, request_id=f"req_{i}")
    await quotas.settle_async(admission.hold, 20, record, admission.caller.api_key)
    await limiter.release_async(admission.decision, 20)


async def main():
    for i in range(200):
        await one(f"w{i}")
    walls, cpu0 = [], time.process_time()
    for i in range(args.requests):
        t = time.perf_counter()
        await one(i)
        walls.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    walls.sort()
    print(f"{ROOT}: {args.requests} requests, CPU {cpu / args.requests * 1000:.3f} ms/request,"
          f" wall p50 {statistics.median(walls) * 1000:.2f} ms p99 {walls[int(0.99 * len(walls))] * 1000:.2f} ms,"
          f" load {os.getloadavg()[0]:.1f}")

asyncio.run(main())
