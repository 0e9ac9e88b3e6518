"""The session API's OpenAPI document (drf-spectacular) and Swagger UI (drf-spectacular-sidecar, local
files only), and its one error shape: every refusal under /api/ is {"error": {message, type, param, code}}."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.test import Client

from accounts import codes
from accounts.models import APIKey

from . import test_browser
from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import make_user

ERROR_FIELDS = {"message", "type", "param", "code"}


def test_schema_describes_every_session_endpoint_and_validates(db, tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    schema = yaml.safe_load(out.read_text())
    assert set(schema["paths"]) == {"/api/keys", "/api/keys/{id}", "/api/keys/{id}/roll", "/api/redeem",
                                    "/api/entitlements", "/api/entitlements/{id}", "/api/usage"}
    assert set(schema["components"]["schemas"]["ErrorDetail"]["properties"]) >= ERROR_FIELDS
    assert schema["paths"]["/api/redeem"]["post"]["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}


def test_schema_and_docs_are_served(client):
    schema = client.get("/api/schema", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "MaaS console API"
    page = client.get("/api/docs").content.decode()
    assert "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    assert "<style>" not in page and "<script>" not in page  # CSP: no inline style or script
    assert client.get("/api/docs", {"script": ""}).status_code == 200  # the start-up script, as a file


def assert_shape(response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) >= ERROR_FIELDS, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.django_db
def test_every_session_endpoint_refuses_in_the_one_shape(client_a, org_a, org_b):
    invalid = assert_shape(client_a.post("/api/keys", {"name": ""}, content_type="application/json"), 400, "invalid",
                           "name")
    assert invalid["type"] == "invalid_request_error" and "name" in invalid["fields"]
    other_key = APIKey.objects.create_key(org_b, "b's")[0]
    assert assert_shape(client_a.get(f"/api/keys/{other_key.pk}"), 404, "not_found")["type"] == "not_found_error"
    assert_shape(client_a.post("/api/redeem", {"code": ""}, content_type="application/json"), 400, "invalid", "code")
    assert_shape(client_a.post("/api/redeem", {"code": "mac-00000000-" + "a" * 26}, content_type="application/json"),
                 404, param="code")
    assert_shape(client_a.get("/api/entitlements/999999"), 404, "not_found")
    assert_shape(client_a.get("/api/usage", {"group_by": "week"}), 400, "invalid", "group_by")
    assert_shape(client_a.get("/api/usage", {"start": "nope"}), 400, "invalid", "start")
    assert_shape(client_a.post("/api/keys", "{not json", content_type="application/json"), 400, "parse_error")
    own = APIKey.objects.create_key(org_a, "to roll")[0]
    assert client_a.post(f"/api/keys/{own.pk}/roll", {"grace_seconds": 0}, content_type="application/json").status_code == 201
    rolled_again = client_a.post(f"/api/keys/{own.pk}/roll", {"grace_seconds": 0}, content_type="application/json")
    assert assert_shape(rolled_again, 409)["type"] == "conflict_error"
    assert_shape(client_a.get(f"/api/keys/{own.pk}/roll"), 405, "method_not_allowed")


@pytest.mark.django_db
def test_refusals_without_login_or_csrf_token_have_the_shape_too(owner_a, org_a):
    anonymous = Client()
    assert assert_shape(anonymous.get("/api/keys"), 403, "not_authenticated")["type"] == "permission_error"
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(owner_a)
    assert "CSRF" in assert_shape(strict.post("/api/keys", {"name": "x"}, content_type="application/json"), 403,
                                  "permission_denied")["message"]
    lonely = Client()
    lonely.force_login(make_user("lonely@example.com"))
    assert_shape(lonely.get("/api/usage"), 403, "no_organization")


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not Path(test_browser.CHROMIUM).exists(), reason="Chromium is installed by `make services`")
def test_swagger_ui_loads_everything_from_this_host(live_server, monkeypatch, tmp_path):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")
    codes.issue_codes(1)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=test_browser.CHROMIUM, args=test_browser.CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', "
                             "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
        page.goto(f"{live_server.url}/api/docs")
        page.locator(".opblock-summary-path", has_text="/api/redeem").wait_for(timeout=45_000)
        assert page.locator(".opblock").count() >= 8
        assert requested and all(url.startswith((live_server.url, "data:")) for url in requested), requested
        assert page.evaluate("window.__csp") == []
        shots = Path("/tmp/console-shots")
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "api-docs-desktop.png"))
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(shots / "api-docs-phone.png"))
        browser.close()
