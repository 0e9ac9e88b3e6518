"""platform/k8s/example.yaml (README "Scaling") checked by parsing, as compose.yaml is: every Service and
HPA points at a workload that exists, selectors match their pods, named ports exist, probes hit real
paths, secrets come only from the Secret, the Celery workers split the interactive and batch queues, and
the engine HPA scales on a metric the engine exports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ("Deployment", "StatefulSet")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "platform/k8s/example.yaml").read_text()) if d]


def by_kind(docs, *kinds) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in kinds}


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def test_every_selector_matches_its_pods_and_every_service_reaches_a_named_port(docs):
    workloads = by_kind(docs, *WORKLOADS)
    assert {"web", "worker", "worker-batch", "beat", "pgbouncer", "engine-smollm2"} <= set(workloads)
    for name, workload in workloads.items():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items(), name
    for name, service in by_kind(docs, "Service").items():
        pods = [w for w in workloads.values()
                if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, name  # exactly one workload behind each Service
        ports = {p["name"] for c in containers(pods[0]) for p in c.get("ports", ())}
        assert all(p["targetPort"] in ports for p in service["spec"]["ports"]), name
    engine = workloads["engine-smollm2"]
    assert engine["spec"]["serviceName"] == "engine-smollm2"
    assert by_kind(docs, "Service")["engine-smollm2"]["spec"]["clusterIP"] == "None"  # one address per replica


def test_probes_use_paths_the_servers_answer(docs):
    engine_paths = set(re.findall(r'Route\("([^"{]+)"', (ROOT / "engine/server.py").read_text()))
    assert {"/health", "/load", "/metrics"} <= engine_paths
    for name, workload in by_kind(docs, *WORKLOADS).items():
        for container in containers(workload):
            for probe in (container.get("readinessProbe"), container.get("livenessProbe")):
                if probe and "httpGet" in probe:
                    assert probe["httpGet"]["path"] == "/health", name
                    assert probe["httpGet"]["port"] in {p["name"] for p in container["ports"]}, name


def test_secrets_come_only_from_the_secret(docs):
    for name, workload in by_kind(docs, *WORKLOADS).items():
        for container in containers(workload):
            for variable in container.get("env", ()):
                if SECRET_NAME.search(variable["name"]):
                    assert "value" not in variable and variable["valueFrom"]["secretKeyRef"]["name"] == "maas", name


def test_celery_workers_split_interactive_and_batch_queues_and_beat_is_one(docs):
    workloads = by_kind(docs, *WORKLOADS)

    def queues(name: str) -> str:
        command = containers(workloads[name])[0]["command"]
        return command[command.index("-Q") + 1]

    assert queues("worker-batch") == settings.BATCH_QUEUE
    assert settings.BATCH_QUEUE not in queues("worker").split(",")
    assert workloads["beat"]["spec"]["replicas"] == 1 and workloads["beat"]["spec"]["strategy"]["type"] == "Recreate"


def test_autoscalers_target_existing_workloads_and_the_engine_scales_on_its_queue(docs):
    workloads = by_kind(docs, *WORKLOADS)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in workloads and workloads[target["name"]]["kind"] == target["kind"], name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
    [metric] = hpas["engine-smollm2"]["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert f'Gauge("{name}"' in (ROOT / "engine/metrics.py").read_text()  # the engine exports it
    args = containers(workloads["engine-smollm2"])[0]["args"]
    assert args[0] == "serve" and args[args.index("--port") + 1] == "8001"
    assert "$(ENGINE_API_KEY)" in args  # expanded by Kubernetes from the container's env
