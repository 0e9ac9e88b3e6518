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
    """Stopped replicas wanted again (their sources checked again, all before any changes: a file may have
    moved)."""
    stopped = list(replicas.exclude(desired=ReplicaState.RUNNING).select_related("model"))
    for replica in stopped:
        check_servable(replica.model)
    return _save_each(stopped, desired=ReplicaState.RUNNING)


def stop_replicas(replicas) -> int:
    """Desired state stopped: the launcher unregisters each one, then ends its process."""
    return _save_each(replicas.exclude(desired=ReplicaState.STOPPED), desired=ReplicaState.STOPPED)


def restart_replicas(replicas) -> int:
    """A new generation (and running): the launcher replaces each process with a fresh one."""
    return _save_each(replicas, desired=ReplicaState.RUNNING, generation=F("generation") + 1)


def _save_each(replicas, **fields) -> int:
    """Set `fields` on each replica and save it, one by one (each save is audited, a queryset update is not);
    how many were changed."""
    changed = 0
    for replica in replicas:
        for name, value in fields.items():
            setattr(replica, name, value)
        replica.save(update_fields=list(fields))
        changed += 1
    return changed
