"""Replica choice (catalog.pick): fewest requests in flight per unit of weight, higher weight on ties;
disabled deployments never loaded, unhealthy and benched ones skipped."""

from __future__ import annotations

import pytest

from inference.catalog import Catalog
from inference.models import AIModel, Deployment

pytestmark = pytest.mark.django_db


@pytest.fixture
def replicas():
    model = AIModel.objects.create(name="replicas")
    heavy = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9001", weight=2)
    light = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9002", weight=1)
    disabled = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9003", weight=5, enabled=False)
    sick = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9004", weight=5, healthy=False)
    return heavy.pk, light.pk, disabled.pk, sick.pk


def test_fewest_in_flight_per_weight_then_the_heavier_replica(replicas):
    heavy, light, disabled, sick = replicas
    catalog = Catalog()
    entry = catalog.entries()["replicas"]
    assert sorted(u.id for u in entry.upstreams) == sorted([heavy, light, sick])  # the disabled one is not loaded
    picks = []
    for _ in range(6):
        upstream = catalog.pick(entry)
        catalog.started(upstream)
        picks.append(upstream.id)
    # in flight / weight: 0 vs 0 (weight decides), .5 vs 0, .5 vs 1, 1 vs 1 (weight), 1.5 vs 1, 1.5 vs 2
    assert picks == [heavy, light, heavy, heavy, light, heavy]
    assert sick not in picks
    for _ in range(3):
        catalog.finished(next(u for u in entry.upstreams if u.id == heavy))
    assert catalog.in_flight[heavy] == 1 and catalog.pick(entry).id == heavy  # .5 vs 2


def test_benched_and_unhealthy_replicas_are_skipped(replicas):
    heavy, light, disabled, sick = replicas
    catalog = Catalog()
    entry = catalog.entries()["replicas"]
    catalog.bench(next(u for u in entry.upstreams if u.id == heavy))
    assert catalog.pick(entry).id == light
    catalog.bench(next(u for u in entry.upstreams if u.id == light))
    assert catalog.pick(entry) is None  # the only one left is unhealthy
