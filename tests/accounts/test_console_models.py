"""The models page and GET /v1/models: the catalog as the organization sees it (description, context
length, capabilities, prices, status from the replicas' health), the same data from both, and the
status following real replicas (stub engine processes) as they go down."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from django.urls import reverse

from accounts.codes import issue_codes, redeem
from accounts.models import APIKey
from inference.catalog import catalog, check_deployments
from inference.models import AIModel, Deployment, Visibility
from tests.inference.conftest import start_stub_upstream
from tests.processes import stop

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import make_org, make_user, start_console_gateway

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def replicas():
    """Two real upstream processes serving one model; a test stops them to take replicas down."""
    started = [start_stub_upstream() for _ in range(2)]
    yield started
    for _, process in started:
        if process.poll() is None:
            stop(process)


@pytest.fixture
def gateway_url(django_db_setup):
    url, process = start_console_gateway()
    yield url
    stop(process)


@pytest.fixture
def catalog_of_three(replicas, org_a):
    """chat-small on both replicas; another organization's listed model; a disabled one."""
    small = AIModel.objects.create(
        name="chat-small", display_name="Chat Small", description="A small model for chat.", context_length=4096,
        price_input_per_million=Decimal("0.15"), price_cached_input_per_million=Decimal("0.075"),
        price_output_per_million=Decimal("0.6"),
    )
    for url, _ in replicas:
        Deployment.objects.create(model=small, base_url=url)
    other = make_org(make_user("other-owner@example.com"), "other-org")
    private = AIModel.objects.create(name="other-private", visibility=Visibility.LISTED)
    private.organizations.add(other)
    AIModel.objects.create(name="switched-off", enabled=False)
    redeem(org_a, issue_codes(1, token_quota=10_000)[0].raw, org_a.memberships.first().user)
    catalog.invalidate()
    return small


def page_cards(client) -> dict[str, str]:
    html = client.get(reverse("models")).content.decode()
    return {name: html for name in ("chat-small", "other-private", "switched-off") if f'data-model="{name}"' in html}


def status_on_page(client) -> str:
    html = client.get(reverse("models")).content.decode()
    return html.split('data-model="chat-small"', 1)[1].split('data-status="', 1)[1].split('"', 1)[0]


def test_models_page_and_v1_models_agree_and_follow_replicas_going_down(client_a, org_a, catalog_of_three, replicas,
                                                                        gateway_url, settings):
    settings.GATEWAY_CATALOG_CACHE_SECONDS = 0
    _, raw_key = APIKey.objects.create_key(org_a, "models test")
    check_deployments()

    response = client_a.get(reverse("models"))
    html = response.content.decode()
    assert response.status_code == 200
    assert list(page_cards(client_a)) == ["chat-small"]  # not another organization's, not a disabled one
    for shown in ("Chat Small", "A small model for chat.", "4,096 tokens", "0.15 per 1M tokens",
                  "0.075 per 1M tokens", "0.6 per 1M tokens", "JSON mode", "Tools"):
        assert shown in html, shown
    assert status_on_page(client_a) == "up"

    def listed() -> dict:
        answer = httpx.get(f"{gateway_url}/v1/models", headers={"Authorization": f"Bearer {raw_key}"})
        assert answer.status_code == 200
        (only,) = answer.json()["data"]
        return only

    model = listed()
    assert model["id"] == "chat-small" and model["description"] == "A small model for chat."
    assert model["max_model_len"] == 4096 and model["display_name"] == "Chat Small"
    assert model["pricing"] == {"unit": "per_million_tokens", "input": "0.15", "cached_input": "0.075", "output": "0.6", "batch_discount_percent": 50}
    assert model["status"] == "up"

    stop(replicas[1][1])  # one replica goes down
    assert check_deployments() == {"healthy": 1, "unhealthy": 1}
    assert status_on_page(client_a) == "degraded" and listed()["status"] == "degraded"
    assert "Some replicas failed their last health check" in client_a.get(reverse("models")).content.decode()

    stop(replicas[0][1])  # and the other
    check_deployments()
    assert status_on_page(client_a) == "down" and listed()["status"] == "down"
    chat = httpx.post(f"{gateway_url}/v1/chat/completions", headers={"Authorization": f"Bearer {raw_key}"},
                      json={"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 503  # what "down" means to a caller


def test_models_page_without_entitlement_calls_to_redeem(client_a, org_a):
    AIModel.objects.create(name="chat-small")
    catalog.invalidate()
    html = client_a.get(reverse("models")).content.decode()
    assert "No models yet" in html and 'data-model="chat-small"' not in html


def test_models_page_respects_the_entitlements_model_list(client_a, org_a):
    AIModel.objects.create(name="covered")
    AIModel.objects.create(name="not-covered")
    redeem(org_a, issue_codes(1, model_names=["covered"])[0].raw, org_a.memberships.first().user)
    catalog.invalidate()
    html = client_a.get(reverse("models")).content.decode()
    assert 'data-model="covered"' in html and 'data-model="not-covered"' not in html


def test_models_page_shows_embedding_models_without_a_playground_link(client_a, org_a):
    AIModel.objects.create(name="an-embedder", kind="embeddings")
    redeem(org_a, issue_codes(1)[0].raw, org_a.memberships.first().user)
    catalog.invalidate()
    html = client_a.get(reverse("models")).content.decode()
    card = html.split('data-model="an-embedder"', 1)[1]
    assert "Embeddings (<code>/v1/embeddings</code>)" in card and "Try it in the playground" not in card


def test_models_page_requires_login(client):
    assert client.get(reverse("models")).status_code == 302
