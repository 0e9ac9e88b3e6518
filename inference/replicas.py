"""Services for platform-run replicas: the admin's actions and runplatform write desired state here; the
launcher (inference/launcher.py) makes the processes match it. Nothing here touches a process."""

from __future__ import annotations

from django.db import transaction
from django.db.models import F

from . import sources
from .models import AIModel, Replica, ReplicaState


class ReplicaError(ValueError):
    """The model cannot get a platform-run replica (the message says why)."""


def model_defaults(source: sources.Source) -> dict:
    """The catalog fields a source pre-fills (the admin's add form, runplatform)."""
    return {
        "name": source.suggested_name,
        "display_name": source.suggested_name,
        "description": source.description,
        "context_length": source.info.context_length or 2048,
        "kind": source.info.kind,
        "source": source.id,
    }


def check_servable(model: AIModel) -> None:
    """ReplicaError unless the model's source is one the engine can serve (inside MODELS_DIR or a demo)."""
    if not model.source:
        raise ReplicaError(f"{model.name} has no source: add it from *Model sources* or set its source first.")
    try:
        source = sources.get(model.source)
    except sources.SourceError as exc:
        raise ReplicaError(f"{model.name}: {exc}") from None
    if source.info.refusal:
        raise ReplicaError(f"{model.name}: the engine cannot serve {model.source}: {source.info.refusal}")


@transaction.atomic
def start_replica(model: AIModel, **options) -> Replica:
    """A new replica of `model` the launcher is to run (options: Replica's engine fields)."""
    check_servable(model)
    replica = Replica(model=model, desired=ReplicaState.RUNNING, **options)
    replica.full_clean(exclude=["model", "deployment"])
    replica.save()
    return replica


def start_replicas(replicas) -> int:
    """Stopped replicas wanted again (their sources checked again: a file may have moved)."""
    changed = 0
    for replica in replicas.exclude(desired=ReplicaState.RUNNING).select_related("model"):
        check_servable(replica.model)
        replica.desired = ReplicaState.RUNNING
        replica.save(update_fields=["desired"])
        changed += 1
    return changed


def stop_replicas(replicas) -> int:
    """Desired state stopped: the launcher unregisters each one, then ends its process."""
    changed = 0
    for replica in replicas.exclude(desired=ReplicaState.STOPPED):
        replica.desired = ReplicaState.STOPPED
        replica.save(update_fields=["desired"])
        changed += 1
    return changed


def restart_replicas(replicas) -> int:
    """A new generation (and running): the launcher replaces each process with a fresh one."""
    changed = 0
    for replica in replicas:
        replica.desired = ReplicaState.RUNNING
        replica.generation = F("generation") + 1
        replica.save(update_fields=["desired", "generation"])
        changed += 1
    return changed
