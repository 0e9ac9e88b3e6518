"""Engine spans drawn from a request's timestamps, checked with the SDK's in-memory exporter."""

import time

import pytest
from opentelemetry import baggage, context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine import telemetry
from engine.llm_engine import RequestOutput


@pytest.fixture
def exporter(monkeypatch):
    monkeypatch.setattr(telemetry, "_enabled", True)
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    memory.provider = provider
    return memory


def finished_output() -> RequestOutput:
    now = time.perf_counter()
    return RequestOutput(
        "chatcmpl-1", [], True, num_prompt_tokens=40, num_cached_tokens=32, num_output_tokens=5,
        arrival_time=now - 1.0, first_scheduled_time=now - 0.9, first_token_time=now - 0.5, finish_time=now - 0.1,
    )


def record(exporter, **kwargs):
    telemetry.record_request(finished_output(), model="smollm2", finish_reasons=["stop"], request_id="req_1",
                             prompt=[{"role": "user", "content": "secret prompt"}], completion=["secret answer"],
                             tracer_provider=exporter.provider, **kwargs)
    return {s.name: s for s in exporter.get_finished_spans()}


def test_phases_have_the_engine_timings_and_counts(exporter, monkeypatch):
    monkeypatch.delenv(telemetry.CAPTURE_CONTENT_ENV, raising=False)
    token = context.attach(baggage.set_baggage(telemetry.BAGGAGE_API_KEY, "abcd1234abcd1234",
                                               context=baggage.set_baggage(telemetry.BAGGAGE_ORGANIZATION, "7")))
    try:
        spans = record(exporter)
    finally:
        context.detach(token)
    assert set(spans) == {"engine.generate", "engine.queue_wait", "engine.time_to_first_token", "engine.prefill",
                          "engine.decode"}
    ms = {name: (s.end_time - s.start_time) / 1e6 for name, s in spans.items()}
    assert ms["engine.queue_wait"] == pytest.approx(100, abs=2)
    assert ms["engine.prefill"] == pytest.approx(400, abs=2)
    assert ms["engine.time_to_first_token"] == pytest.approx(500, abs=2)
    assert ms["engine.decode"] == pytest.approx(400, abs=2)
    assert ms["engine.generate"] == pytest.approx(900, abs=2)
    generate = spans["engine.generate"]
    assert spans["engine.prefill"].parent.span_id == spans["engine.time_to_first_token"].context.span_id
    assert spans["engine.decode"].parent.span_id == generate.context.span_id
    assert spans["engine.prefill"].attributes["maas.engine.cached_tokens"] == 32
    assert spans["engine.prefill"].attributes["maas.engine.prefill_tokens"] == 8
    assert generate.attributes["maas.organization.id"] == "7"
    assert generate.attributes["maas.api_key.id"] == "abcd1234abcd1234"
    assert generate.attributes["gen_ai.usage.output_tokens"] == 5
    assert generate.attributes["maas.status"] == "ok"
    assert "secret" not in repr([dict(s.attributes) for s in spans.values()])


def test_text_only_when_the_operator_turns_it_on(exporter, monkeypatch):
    monkeypatch.setenv(telemetry.CAPTURE_CONTENT_ENV, "true")
    generate = record(exporter)["engine.generate"]
    assert "secret prompt" in generate.attributes["gen_ai.prompt"]
    assert "secret answer" in generate.attributes["gen_ai.completion"]


def test_off_without_otel_environment(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    assert not telemetry.tracing_requested()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert telemetry.tracing_requested()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry.tracing_requested()


def test_engine_json_logs_carry_the_trace_id():
    import json
    import os
    import subprocess
    import sys

    code = (
        "import logging; from opentelemetry.sdk.trace import TracerProvider; from engine import telemetry; "
        "telemetry.configure_logging('info'); tracer = TracerProvider().get_tracer('t'); "
        "span = tracer.start_span('s'); from opentelemetry import trace; "
        "ctx = trace.use_span(span, end_on_exit=True); ctx.__enter__(); "
        "logging.getLogger('engine.x').warning('inside %s', 'span'); "
        "print(format(span.get_span_context().trace_id, '032x'))"
    )
    env = {**os.environ, "LOG_FORMAT": "json"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["message"] == "inside span" and line["level"] == "WARNING" and line["logger"] == "engine.x"
    assert line["trace_id"] == result.stdout.strip()
