"""Deployment URLs are limited to DEPLOYMENT_ALLOWED_UPSTREAMS (hosts and networks): staff with
change_deployment cannot send every tenant's prompts and the engine token to a host of their choice."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from django.core.exceptions import ValidationError

from accounts.models import User
from inference.catalog import check_deployment
from inference.models import AIModel, Deployment

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(db) -> AIModel:
    return AIModel.objects.create(name="smollm2")


@pytest.fixture
def engine():
    """A real HTTP server answering /health, counting the requests (and tokens) it receives."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("authorization", ""))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.seen = seen
    yield server
    server.shutdown()
    server.server_close()


def test_admin_refuses_an_upstream_outside_the_allowlist(client, model):
    client.force_login(User.objects.create_superuser("root@example.com", "pw-not-used-123"))
    response = client.post("/admin/inference/deployment/add/", {
        "model": model.pk, "base_url": "http://203.0.113.10:8001", "internal_token": "t", "weight": "1", "enabled": "on",
    })
    assert response.status_code == 200
    assert "not in DEPLOYMENT_ALLOWED_UPSTREAMS" in response.content.decode()
    assert not Deployment.objects.exists()


def test_saving_outside_the_allowlist_is_refused_on_every_path(model):
    with pytest.raises(ValidationError):
        Deployment.objects.create(model=model, base_url="http://203.0.113.10:8001")
    with pytest.raises(ValidationError):  # a name resolving outside the networks
        Deployment.objects.create(model=model, base_url="http://no-such-host.invalid:8001")
    assert not Deployment.objects.exists()


def test_default_allows_loopback_and_private_networks(model):
    for url in ("http://127.0.0.1:8001", "http://localhost:8001", "http://10.1.2.3:8001", "http://[::1]:8001",
                "http://192.168.7.7"):
        Deployment.objects.create(model=model, base_url=url)
    assert Deployment.objects.count() == 5


def test_listed_host_names_are_allowed(model, settings):
    settings.DEPLOYMENT_ALLOWED_UPSTREAMS = ["engine-smollm2", "10.0.0.0/8"]
    Deployment.objects.create(model=model, base_url="http://engine-smollm2:8001")
    with pytest.raises(ValidationError):
        Deployment.objects.create(model=model, base_url="http://127.0.0.1:8001")


def test_health_check_refuses_an_upstream_no_longer_allowed(model, engine, settings):
    deployment = Deployment.objects.create(model=model, base_url=engine.url, internal_token="engine-token")
    with httpx.Client(timeout=5) as http:
        assert check_deployment(deployment, http) is True
        assert engine.seen == ["Bearer engine-token"]
        settings.DEPLOYMENT_ALLOWED_UPSTREAMS = ["10.0.0.0/8"]
        assert check_deployment(deployment, http) is False
    deployment.refresh_from_db()
    assert not deployment.healthy and "DEPLOYMENT_ALLOWED_UPSTREAMS" in deployment.last_error
    assert engine.seen == ["Bearer engine-token"]  # the token went nowhere the second time
