"""Every metric the gateway and the engine export is documented in the README (and named by convention)."""

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import EngineMetrics
from inference import metrics as gateway

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue  # prometheus-client's creation-time series of each counter/histogram
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_gateway_metrics_are_documented():
    registry = CollectorRegistry()
    for name in dir(gateway):
        metric = getattr(gateway, name)
        if hasattr(metric, "_name") and hasattr(metric, "collect"):
            registry.register(metric)
    names = exported_names(generate_latest(registry).decode()) | {"maas_gateway_deployment_healthy"}  # read from the DB
    assert len(names) >= 9
    for name in names:
        assert re.fullmatch(r"maas_gateway_[a-z0-9_]+", name), name
        assert f"`{name}`" in README, f"{name} is not documented in README.md"


def test_engine_metrics_are_documented():
    names = exported_names(EngineMetrics("m").render().decode())
    assert names
    for name in names:
        assert re.fullmatch(r"engine_[a-z0-9_]+", name), name
        assert name in README, f"{name} is not documented in README.md"
