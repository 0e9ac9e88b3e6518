"""The launcher's desired state rendered for Kubernetes: a Deployment and a Service per wanted replica.

The engine's arguments come from `launcher.engine_args` (the same rule as on one host), with the source
under /models (the PersistentVolumeClaim holding MODELS_DIR). Demo `package:` sources live inside the
local Python environment, not in the claim, so they are skipped (and named in `skipped`).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from .launcher import engine_args
from .models import Replica, ReplicaState
from .sources import PACKAGE_PREFIX

TEMPLATE = Path(settings.BASE_DIR) / "platform" / "k8s" / "replica.yaml"
ENGINE_PORT = 8001
MODELS_MOUNT = "/models"


@dataclass
class Rendered:
    documents: list[str] = field(default_factory=list)  # one YAML text (Deployment + Service) per replica
    skipped: list[str] = field(default_factory=list)  # why a wanted replica has no manifest
    replicas: list[Replica] = field(default_factory=list)  # those rendered

    @property
    def text(self) -> str:
        return "\n---\n".join(self.documents)


def resource_name(replica: Replica) -> str:
    return f"maas-replica-{replica.pk}"


def service_url(replica: Replica, namespace: str) -> str:
    """What to register as the replica's Deployment base URL in the catalog."""
    return f"http://{resource_name(replica)}.{namespace}.svc.cluster.local:{ENGINE_PORT}"


def label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("._-") or "model"


def render(*, namespace: str = "maas", image: str = "maas-engine:latest", secret: str = "maas-engine",
           models_claim: str = "maas-models", template: Path = TEMPLATE) -> Rendered:
    source = string.Template(template.read_text())
    rendered = Rendered()
    for replica in Replica.objects.filter(desired=ReplicaState.RUNNING).select_related("model").order_by("pk"):
        if replica.model.source.startswith(PACKAGE_PREFIX) or not replica.model.source:
            rendered.skipped.append(f"{replica}: source {replica.model.source or '(none)'!r} is not in MODELS_DIR")
            continue
        name = resource_name(replica)
        selector = {"app.kubernetes.io/instance": name}
        labels = {"app.kubernetes.io/name": "maas-engine", "app.kubernetes.io/part-of": "maas", **selector,
                  "maas/replica": str(replica.pk), "maas/model": label_value(replica.model.name)}
        gpu = replica.device.startswith("cuda")
        values = {
            "name": name, "namespace": namespace, "labels": labels, "selector": selector, "image": image,
            "args": engine_args(replica, f"{MODELS_MOUNT}/{replica.model.source}", host="0.0.0.0", port=ENGINE_PORT),
            "secret": secret, "port": ENGINE_PORT, "models_claim": models_claim,
            "resources": {"limits": {"nvidia.com/gpu": 1}} if gpu else {},
        }
        rendered.replicas.append(replica)
        rendered.documents.append(source.substitute({key: json.dumps(value) for key, value in values.items()}))
    return rendered
