"""The Celery application; configuration comes from Django settings (CELERY_* names).

Run: `celery -A maas worker -l info` and `celery -A maas beat -l info` (the beat schedule is
CELERY_BEAT_SCHEDULE in settings).
"""

import os

from celery import Celery
from celery.signals import beat_init, worker_init, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "maas.settings")

app = Celery("maas")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect(weak=False)
def _trace_worker(**_kwargs) -> None:
    # In the parent before the pool forks: the SDK's span processors re-create their thread in each child.
    from maas.telemetry import configure_telemetry

    configure_telemetry("maas-worker")


@beat_init.connect(weak=False)
def _trace_beat(**_kwargs) -> None:
    from maas.telemetry import configure_telemetry

    configure_telemetry("maas-beat")


@worker_ready.connect(weak=False)
def _resume_batches(**_kwargs) -> None:
    """A (re)started worker takes up the batches whose runner died (inference/batch_runner.py)."""
    from inference.tasks import resume_batches

    resume_batches.delay()
