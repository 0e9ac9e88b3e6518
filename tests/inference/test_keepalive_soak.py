"""Soak: the measurement of the keep-alive race, through the gateway. 20 clients each send 12 small chat
requests with pauses of 4.97-5.03 s, against an engine and a gateway pool that both use the 5 s idle
timeout (uvicorn's and httpx's defaults, under which the race was measured), so pooled connections are
reused just as the engine closes them; every request must still be answered (the retry on a fresh
connection). About 70 s: run with `RUN_SOAK=1 .venv/bin/pytest tests/inference/test_keepalive_soak.py`.
"""

from __future__ import annotations

import asyncio
import os
import random
import re

import httpx
import pytest

from engine.loader import demo_model_path

from .conftest import add_model, make_tenant, start_engine, start_gateway, stop

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("RUN_SOAK"), reason="a 70 s soak: set RUN_SOAK=1"),
]
TOKEN = "soak-metrics"


def test_240_paced_requests_through_the_gateway_all_answer(django_db_setup, redis_clean):
    engine, engine_url = start_engine(demo_model_path(), "--served-model-name", "soak", "--threads", "1",
                                      "--max-model-len", "512", "--log-level", "warning",
                                      "--timeout-keep-alive", "5")
    gateway, gateway_process = start_gateway(GATEWAY_UPSTREAM_KEEPALIVE_EXPIRY="5", METRICS_TOKEN=TOKEN)
    try:
        add_model("soak", engine_url, context_length=512)
        key = make_tenant("soak", token_quota=10**9).raw_key

        async def client(results: list) -> None:
            async with httpx.AsyncClient(base_url=gateway, timeout=60,
                                         headers={"authorization": f"Bearer {key}"}) as http:
                for _ in range(12):
                    response = await http.post("/v1/chat/completions", json={
                        "model": "soak", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
                    results.append(response.status_code)
                    await asyncio.sleep(random.uniform(4.97, 5.03))

        async def run() -> list:
            results: list[int] = []
            await asyncio.gather(*(client(results) for _ in range(20)))
            return results

        results = asyncio.run(run())
        metrics = httpx.get(f"{gateway}/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
        retried = sum(float(v) for v in re.findall(
            r"^maas_gateway_upstream_retries_total\{[^}]*\} ([0-9.e+]+)$", metrics, re.M))
        print(f"soak: {results.count(200)}/{len(results)} answered 200, {retried:.0f} retried on a fresh connection")
        assert results.count(200) == len(results) == 240, sorted(set(results))
    finally:
        stop(gateway_process)
        stop(engine)
