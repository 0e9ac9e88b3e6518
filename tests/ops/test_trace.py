"""One request through the real gateway (uvicorn, maas.asgi) and the real engine (`python -m engine serve`
on SmolLM2), both exporting OTLP/HTTP to a collector run by this test: a single trace covers the spans
of both processes, with the expected parent links. The trace is printed (span tree with timings)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.inference.conftest import add_model, make_tenant, start_gateway
from tests.processes import ROOT, start_engine, stop

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ENGINE_TOKEN = "engine-internal-token-for-trace-test"


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    kind: int
    attributes: dict = field(default_factory=dict)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Collector:
    """A minimal OTLP/HTTP (protobuf) trace receiver."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                collector.add(request)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        self.spans.append(Span(
                            resource.get("service.name", ""), s.name, s.trace_id.hex(), s.span_id.hex(),
                            s.parent_span_id.hex(), s.start_time_unix_nano, s.end_time_unix_nano, s.kind,
                            {a.key: _value(a.value) for a in s.attributes},
                        ))

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def otel_env(collector: Collector, service: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.close()


@pytest.fixture(scope="module")
def traced_engine(collector):
    from engine.loader import demo_model_path

    env = {**otel_env(collector, "maas-engine-test"), "LOG_FORMAT": "json"}
    process, url = start_engine(demo_model_path(), "--served-model-name", "smollm2", "--threads", "1",
                                "--max-model-len", "1024", "--api-key", ENGINE_TOKEN, "--log-level", "warning",
                                env=env, timeout=240)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def traced_gateway(django_db_setup, collector):
    url, process = start_gateway(GATEWAY_UPSTREAM_READ_TIMEOUT="120", **otel_env(collector, "maas-web-test"))
    yield url
    stop(process)


def print_trace(spans: list[Span]) -> None:
    by_parent: dict[str, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for s in spans:
        by_parent.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    t0 = min(s.start_ns for s in spans)

    def walk(parent: str, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda s: s.start_ns):
            offset, duration = (s.start_ns - t0) / 1e6, (s.end_ns - s.start_ns) / 1e6
            print(f"{offset:9.1f} ms {duration:9.1f} ms  {'  ' * depth}{s.name}  [{s.service}]")
            walk(s.span_id, depth + 1)

    print(f"\ntrace {spans[0].trace_id}: {len(spans)} spans (offset from trace start, duration)")
    walk("", 0)


def test_one_trace_covers_gateway_and_engine(collector, traced_engine, traced_gateway):
    model = add_model("smollm2", traced_engine, context_length=1024)
    model.deployments.update(internal_token=ENGINE_TOKEN)
    tenant = make_tenant("traced")
    client = openai.OpenAI(base_url=f"{traced_gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=180)
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8
    )
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]

    def engine_done():
        spans = collector.snapshot()
        decode = [s for s in spans if s.name == "engine.decode"]
        settle = [s for s in spans if s.name == "gateway.settlement"]
        return (decode, settle) if decode and settle else None

    deadline = time.monotonic() + 30
    while not engine_done() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_done(), [s.name for s in collector.snapshot()]
    trace_id = engine_done()[1][0].trace_id
    spans = [s for s in collector.snapshot() if s.trace_id == trace_id]
    print_trace(spans)

    services = {s.service for s in spans}
    assert services == {"maas-web-test", "maas-engine-test"}
    by_id = {s.span_id: s for s in spans}

    def one(name: str, service: str | None = None) -> Span:
        found = [s for s in spans if s.name == name and (service is None or s.service == service)]
        assert len(found) == 1, (name, [(s.name, s.service) for s in spans])
        return found[0]

    def parent(span: Span) -> Span:
        return by_id[span.parent_id]

    server = one("POST v1/chat/completions", "maas-web-test") if any(
        s.name == "POST v1/chat/completions" for s in spans) else [s for s in spans if s.service == "maas-web-test" and not s.parent_id][0]
    assert server.parent_id == ""  # the trace starts at the gateway
    for name in ("gateway.auth", "gateway.quota_reservation", "gateway.upstream_request", "gateway.settlement"):
        assert parent(one(name)).span_id == server.span_id, name
    upstream = one("gateway.upstream_request")
    client_span = [s for s in spans if s.service == "maas-web-test" and s.parent_id == upstream.span_id]
    assert len(client_span) == 1 and client_span[0].kind == 3  # SPAN_KIND_CLIENT (httpx)
    engine_server = [s for s in spans if s.service == "maas-engine-test" and s.kind == 2]  # SPAN_KIND_SERVER
    assert len(engine_server) == 1
    assert engine_server[0].parent_id == client_span[0].span_id  # traceparent crossed the process boundary
    generate = one("engine.generate")
    assert parent(generate).span_id == engine_server[0].span_id
    assert parent(one("engine.queue_wait")).span_id == generate.span_id
    ttft = one("engine.time_to_first_token")
    assert parent(ttft).span_id == generate.span_id
    prefill = one("engine.prefill")
    assert parent(prefill).span_id == ttft.span_id
    decode = one("engine.decode")
    assert parent(decode).span_id == generate.span_id
    assert generate.start_ns <= prefill.start_ns <= prefill.end_ns <= decode.start_ns <= decode.end_ns <= generate.end_ns

    # Attributes: tenant (from baggage on the engine side), model, tokens, status; never the secret or the text.
    usage = completion.usage
    assert generate.attributes["gen_ai.request.model"] == "smollm2"
    assert generate.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert generate.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert generate.attributes["maas.organization.id"] == str(tenant.organization.pk)
    assert generate.attributes["maas.api_key.id"] == tenant.api_key.public_id
    assert generate.attributes["maas.request_id"] == request_id
    assert prefill.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert "maas.engine.cached_tokens" in prefill.attributes
    assert server.attributes["maas.organization.id"] == tenant.organization.pk
    assert server.attributes["maas.api_key.id"] == tenant.api_key.public_id
    assert server.attributes["gen_ai.request.model"] == "smollm2"
    assert server.attributes["http.response.status_code"] == 200
    assert one("gateway.quota_reservation").attributes["maas.reserved_tokens"] >= usage.prompt_tokens + 8  # max_tokens
    settle = one("gateway.settlement")
    assert settle.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert settle.attributes["maas.usage.status"] == "ok"
    everything = repr([s.attributes for s in spans])
    assert tenant.raw_key not in everything and ENGINE_TOKEN not in everything
    assert "Name a colour" not in everything and completion.choices[0].message.content not in everything
    # The database driver is instrumented too (psycopg spans inside the gateway's trace).
    assert any(s.attributes.get("db.system") == "postgresql" or s.attributes.get("db.system.name") == "postgresql"
               for s in spans)


def test_streamed_request_is_traced_too(collector, traced_engine, traced_gateway):
    model = add_model("smollm2", traced_engine, context_length=1024)
    model.deployments.update(internal_token=ENGINE_TOKEN)
    tenant = make_tenant("streamer")
    client = openai.OpenAI(base_url=f"{traced_gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=180)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    ))
    usage = chunks[-1].usage

    def generate_span():
        return [s for s in collector.snapshot() if s.name == "engine.generate"
                and s.attributes.get("maas.api_key.id") == tenant.api_key.public_id]

    deadline = time.monotonic() + 30
    while not generate_span() and time.monotonic() < deadline:
        time.sleep(0.2)
    [generate] = generate_span()
    assert generate.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    same_trace = {s.name for s in collector.snapshot() if s.trace_id == generate.trace_id}
    assert {"gateway.auth", "gateway.quota_reservation", "gateway.upstream_request", "engine.prefill",
            "engine.decode"} <= same_trace


def test_celery_task_continues_the_producers_trace(collector, tmp_path):
    """Celery instrumentation: the task run in a real worker is a child of the publish in the producer."""
    import uuid

    from tests.ops.test_celery_worker import BROKER, Worker

    queue = f"ops-trace-{uuid.uuid4().hex[:8]}"
    (tmp_path / "mail").mkdir()
    worker = Worker(tmp_path / "mail", tmp_path / "worker.log", queue, **otel_env(collector, "maas-worker-test"))
    try:
        producer = "\n".join([
            "import django",
            "django.setup()",
            "from maas.telemetry import configure_telemetry, flush, span",
            "configure_telemetry('producer')",
            "from maas.celery import app",
            "with span('producer.request'):",
            "    app.send_task('inference.tasks.expire_reservations')",
            "flush()",
        ])
        env = {**os.environ, **otel_env(collector, "maas-producer-test"), "DJANGO_SETTINGS_MODULE": "tests.settings",
               "CELERY_BROKER_URL": BROKER, "CELERY_TASK_ALWAYS_EAGER": "0", "CELERY_TASK_DEFAULT_QUEUE": queue}
        env.pop("TEST_DATABASE_NAME", None)
        result = subprocess.run([sys.executable, "-c", producer], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr

        def task_spans():
            spans = collector.snapshot()
            run = [s for s in spans if s.name == "run/inference.tasks.expire_reservations"]
            publish = [s for s in spans if s.name == "apply_async/inference.tasks.expire_reservations"]
            return (run, publish) if run and publish else None

        deadline = time.monotonic() + 60
        while not task_spans() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert task_spans(), [s.name for s in collector.snapshot()][-20:]
        [run], [publish] = task_spans()
        assert (run.service, publish.service) == ("maas-worker-test", "maas-producer-test")
        assert run.trace_id == publish.trace_id and run.parent_id == publish.span_id
        parent = [s for s in collector.snapshot() if s.span_id == publish.parent_id]
        assert parent and parent[0].name == "producer.request"
    finally:
        worker.stop()
