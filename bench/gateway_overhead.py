"""Added latency and maximum throughput of the gateway, in one run.

Starts the stub upstream (tests/inference/stub_upstream.py, a fast OpenAI-compatible answerer) and the
gateway (uvicorn maas.asgi:application, N workers) in front of it, on a fresh PostgreSQL database with
one organization, entitlement (unlimited quota), API key with rate limits (so the Redis limiter runs on
every request) and catalog model. Then, with a small keep-alive HTTP/1.1 client (cheap, so the load
generator leaves the CPU to the servers):

  * latency: sequential non-streaming chat requests, directly to the stub and through the gateway;
    added latency = gateway percentile - direct percentile (p50, p99);
  * throughput: C concurrent connections for T seconds against each; requests/s.

    .venv/bin/python bench/gateway_overhead.py [--workers 2] [--requests 2000] [--concurrency 32] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.inference.conftest import free_port, stop, wait_until_up  # noqa: E402

DB_NAME = "bench_gateway"
BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}


class Connection:
    """One keep-alive HTTP/1.1 connection: just enough protocol for these JSON requests."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}", "content-type: application/json",
                f"content-length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, chunked = None, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
        if chunked:
            data = b""
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        else:
            data = await self.reader.readexactly(length or 0)
        return status, data

    def close(self):
        if self.writer is not None:
            self.writer.close()


def split(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def latencies(url: str, path: str, headers: dict, n: int) -> list[float]:
    conn = Connection(*split(url))
    body = json.dumps(BODY).encode()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, data = await conn.request(path, body, headers)
        out.append((time.perf_counter() - t0) * 1000)
        assert status == 200, data[:300]
    conn.close()
    return out


async def throughput(url: str, path: str, headers: dict, concurrency: int, seconds: float) -> tuple[float, int]:
    body = json.dumps(BODY).encode()
    done, errors = 0, 0
    deadline = time.perf_counter() + seconds

    async def worker():
        nonlocal done, errors
        conn = Connection(*split(url))
        while time.perf_counter() < deadline:
            status, _ = await conn.request(path, body, headers)
            if status == 200:
                done += 1
            else:
                errors += 1
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0), errors


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *map(int, children)]


def server_counters(redis_url: str) -> dict[str, float]:
    """Redis commands by name and PostgreSQL transactions of the benchmark database, so far: round trips
    per request do not depend on the machine's load, unlike the timings."""
    import psycopg
    import redis

    stats = redis.Redis.from_url(redis_url).info("commandstats")
    counts = {name.removeprefix("cmdstat_"): float(v["calls"]) for name, v in stats.items()}
    with psycopg.connect(f"postgres://postgres@127.0.0.1:5432/{DB_NAME}") as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                           (DB_NAME,)).fetchone()
    counts["postgresql transactions"] = float(row[0])
    return counts


def per_request(before: dict[str, float], after: dict[str, float], n: int) -> str:
    ignored = {"info"}  # the counters' own reads
    deltas = {k: (after[k] - before.get(k, 0)) / n for k in after if k not in ignored}
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(deltas.items()) if v >= 0.01)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def prepare_database(env: dict, upstream: str) -> str:
    import psycopg

    with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    script = f"""
import django; django.setup()
from accounts.models import APIKey, Entitlement, Organization
from inference.models import AIModel, Deployment
org = Organization.objects.create(name="bench", slug="bench", requests_per_minute=10_000_000, tokens_per_minute=2_000_000_000)
Entitlement.objects.create(organization=org, token_quota=None)
model = AIModel.objects.create(name="bench-model", context_length=4096)
Deployment.objects.create(model=model, base_url="{upstream}")
key, raw = APIKey.objects.create_key(org, "bench", requests_per_minute=10_000_000, tokens_per_minute=2_000_000_000)
print(raw)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per target for latency")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    args = parser.parse_args()

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "maas.settings",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DB_NAME}",
        "DATABASE_POOL": "1",
        "REDIS_URL": args.redis_url,
        "SECRET_KEY": "bench-only-secret",
        "API_KEY_HMAC_SECRET": "bench-only-hmac-secret",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SECURE_SSL_REDIRECT": "0",
        "LOG_LEVEL": "WARNING",
        "CELERY_TASK_ALWAYS_EAGER": "1",
    }
    env.pop("TEST_DATABASE_NAME", None)
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, str(ROOT / "tests/inference/stub_upstream.py"), "--port", str(stub_port)], cwd=ROOT)
    upstream = f"http://127.0.0.1:{stub_port}"
    gateway_process = None
    try:
        wait_until_up(f"{upstream}/health", stub)
        raw_key = prepare_database(env, upstream)
        port = free_port()
        gateway_process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "maas.asgi:application", "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(args.workers), "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=env,
        )
        gateway = f"http://127.0.0.1:{port}"
        wait_until_up(f"{gateway}/v1/models", gateway_process)
        auth = {"authorization": f"Bearer {raw_key}"}

        async def run():
            await latencies(gateway, "/v1/chat/completions", auth, 200)  # warm every worker's pools
            await latencies(upstream, "/v1/chat/completions", {}, 200)
            direct = await latencies(upstream, "/v1/chat/completions", {}, args.requests)
            counters = server_counters(args.redis_url)
            through = await latencies(gateway, "/v1/chat/completions", auth, args.requests)
            await asyncio.sleep(1.0)  # the settlements' last statements, and PostgreSQL's statistics
            round_trips = per_request(counters, server_counters(args.redis_url), args.requests)
            direct_rps, e1 = await throughput(upstream, "/v1/chat/completions", {}, args.concurrency, args.seconds)
            pids = process_tree(gateway_process.pid)
            cpu_before, started = cpu_seconds(pids), time.perf_counter()
            gateway_rps, e2 = await throughput(gateway, "/v1/chat/completions", auth, args.concurrency, args.seconds)
            served = gateway_rps * (time.perf_counter() - started)
            cpu_ms = (cpu_seconds(pids) - cpu_before) / served * 1000
            return direct, through, direct_rps, gateway_rps, e1 + e2, cpu_ms, round_trips

        direct, through, direct_rps, gateway_rps, errors, cpu_ms, round_trips = asyncio.run(run())
    finally:
        if gateway_process is not None:
            stop(gateway_process)
        stop(stub)

    d50, d99 = percentile(direct, 50), percentile(direct, 99)
    g50, g99 = percentile(through, 50), percentile(through, 99)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"gateway: uvicorn --workers {args.workers}, PostgreSQL (pool) + Redis rate limiter; upstream: stub")
    print(f"latency over {args.requests} sequential requests (ms):")
    print(f"  direct   p50 {d50:.2f}  p99 {d99:.2f}  mean {statistics.mean(direct):.2f}")
    print(f"  gateway  p50 {g50:.2f}  p99 {g99:.2f}  mean {statistics.mean(through):.2f}")
    print(f"  added    p50 {g50 - d50:.2f}  p99 {g99 - d99:.2f}")
    print(f"throughput, {args.concurrency} connections for {args.seconds:g}s: direct {direct_rps:.0f} req/s, "
          f"gateway {gateway_rps:.0f} req/s, non-200 answers: {errors}")
    print(f"gateway CPU per request (all workers, user+system): {cpu_ms:.2f} ms, "
          f"i.e. at most {1000 / cpu_ms:.0f} req/s per free core")
    print(f"per request, sequential phase (Redis commands, a script's own calls counted beside its EVALSHA; PostgreSQL transactions, approximate): {round_trips}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (other processes share the cores)")


if __name__ == "__main__":
    main()
