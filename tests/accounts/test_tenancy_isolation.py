"""Tenant isolation: for every console page and API endpoint that takes an object id, a member (even an
owner) of organization A gets 404 for organization B's object, and the object is left unchanged.

`CASES` must name every URL of the console namespace with an id parameter: the resolver walk below
fails when a URL is added without a case here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from django.forms.models import model_to_dict
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone

from accounts import tenancy
from accounts.models import APIKey, Entitlement, Invitation, Membership, Organization, Role, keyed_hash

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import add_member, make_user

pytestmark = pytest.mark.django_db

ID_PARAMS = {"id", "pk"}


def console_urls_with_ids() -> set[str]:
    """Names of the console namespace's URL patterns that carry an object id."""
    found: set[str] = set()

    def walk(patterns, namespace: str | None):
        for entry in patterns:
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, entry.namespace or namespace)
            elif isinstance(entry, URLPattern) and namespace == "console":
                params = set(entry.pattern.converters) | set(entry.pattern.regex.groupindex)
                if params & ID_PARAMS or any(p.endswith("_id") for p in params):
                    found.add(f"console:{entry.name}")

    walk(get_resolver().url_patterns, None)
    return found


@dataclass
class Case:
    method: str
    make_object: Callable[[Organization], object]  # an object of organization B
    data: dict = field(default_factory=dict)
    json: bool = False


def _key(org):
    return APIKey.objects.create_key(org, "b's key")[0]


def _member(org):
    return add_member(org, make_user(f"member-{secrets.token_hex(4)}@example.com"), Role.MEMBER)


def _invitation(org):
    return Invitation.objects.create(
        organization=org, email="invited@example.com", token_hash=keyed_hash(secrets.token_hex()), expires_at=timezone.now() + timezone.timedelta(days=1)
    )


def _entitlement(org):
    return Entitlement.objects.create(organization=org, token_quota=1000)


CASES: dict[str, list[Case]] = {
    "console:org-switch": [Case("post", lambda org: org)],
    "console:key-revoke": [Case("post", _key)],
    "console:key-roll": [Case("post", _key, {"grace_seconds": "60"})],
    "console:api-key-roll": [Case("post", _key, {"grace_seconds": 60}, json=True)],
    "console:member-role": [Case("post", _member, {"role": "admin"})],
    "console:member-remove": [Case("post", _member)],
    "console:invitation-revoke": [Case("post", _invitation)],
    "console:api-key": [Case("get", _key, json=True), Case("delete", _key, json=True)],
    "console:api-entitlement": [Case("get", _entitlement, json=True)],
}


def test_every_console_url_with_an_id_has_an_isolation_case():
    assert console_urls_with_ids() == set(CASES), "add the new URL to CASES in this file"


@pytest.mark.parametrize(
    "name,case", [(name, case) for name, cases in CASES.items() for case in cases], ids=lambda v: getattr(v, "method", v)
)
def test_member_of_org_a_gets_404_for_org_b_objects(client_a, org_a, org_b, name, case):
    obj = case.make_object(org_b)
    before = model_to_dict(obj)
    url = reverse(name, args=[obj.pk])
    call = getattr(client_a, case.method)
    response = call(url, case.data, content_type="application/json") if case.json else call(url, case.data)
    assert response.status_code == 404, (name, response.status_code)
    # Nothing changed, nothing of B leaked.
    obj.refresh_from_db()
    assert model_to_dict(obj) == before
    body = response.content.decode()
    assert "b&#x27;s key" not in body and "b's key" not in body
    if case.json:
        assert "error" in response.json()
    # The same request for an object of A does not 404: the 404 comes from the scoping, not the route.
    own = case.make_object(org_a)
    own_url = reverse(name, args=[own.pk])
    own_response = call(own_url, case.data, content_type="application/json") if case.json else call(own_url, case.data)
    assert own_response.status_code != 404, (name, own_response.status_code)


def test_list_pages_and_apis_show_only_the_current_org(client_a, org_a, org_b, owner_b):
    APIKey.objects.create_key(org_b, "secret-project-of-b")
    add_member(org_b, make_user("only-in-b@example.com"))
    Invitation.objects.create(
        organization=org_b, email="pending-in-b@example.com", token_hash=keyed_hash(secrets.token_hex()), expires_at=timezone.now() + timezone.timedelta(days=1)
    )
    Entitlement.objects.create(organization=org_b, token_quota=123456789)
    for name in ("console:dashboard", "console:keys", "console:members", "console:api-keys", "console:api-entitlements"):
        body = client_a.get(reverse(name)).content.decode()
        for leak in ("secret-project-of-b", "only-in-b@example.com", "pending-in-b@example.com", "123456789", "123,456,789", owner_b.email):
            assert leak not in body, (name, leak)


def test_services_refuse_cross_org_membership_even_when_called_directly(org_a, org_b, owner_a):
    actor = Membership.objects.get(user=owner_a, organization=org_a)
    target = _member(org_b)
    for action in (lambda: tenancy.change_role(actor, target, Role.ADMIN), lambda: tenancy.remove_member(actor, target)):
        with pytest.raises(Exception) as excinfo:
            action()
        assert excinfo.type.__name__ == "Http404"
    assert Membership.objects.filter(pk=target.pk, role=Role.MEMBER).exists()


def test_audit_page_shows_only_the_current_orgs_events(client_a, org_a, org_b, owner_b):
    """organization/audit/ (owners): events of A's rows, none of B's, whoever made them."""
    APIKey.objects.create_key(org_a, "project-of-a")
    APIKey.objects.create_key(org_b, "secret-project-of-b")
    Invitation.objects.create(
        organization=org_b, email="pending-in-b@example.com", token_hash=keyed_hash(secrets.token_hex()), expires_at=timezone.now() + timezone.timedelta(days=1)
    )
    Entitlement.objects.create(organization=org_b, token_quota=123456789)
    client_b = type(client_a)()
    client_b.force_login(owner_b)
    client_b.post(reverse("console:member-invite"), {"email": "also-in-b@example.com", "role": "member"})
    body = client_a.get(reverse("console:org-audit")).content.decode()
    assert "project-of-a" in body and org_a.slug in body
    for leak in ("secret-project-of-b", "pending-in-b@example.com", "also-in-b@example.com", "123456789", owner_b.email, org_b.slug):
        assert leak not in body, leak


# -- the /v1 API: every URL with an object id -------------------------------------------------------
def api_urls_with_ids() -> set[str]:
    """Names of the URL patterns outside the console namespace (the /v1 API, the inference pages) that
    carry an object id (a parameter named `*_id`)."""
    found: set[str] = set()
    for entry in get_resolver().url_patterns:
        if isinstance(entry, URLResolver) and entry.namespace is None:
            for pattern in entry.url_patterns:
                if isinstance(pattern, URLPattern) and pattern.name and any(
                        p.endswith("_id") for p in pattern.pattern.converters):
                    found.add(pattern.name)
    return found


def _listed_model(org):
    from inference.models import AIModel, Deployment

    model = AIModel.objects.create(name=f"private-{secrets.token_hex(4)}", visibility="listed")
    model.organizations.add(org)
    Deployment.objects.create(model=model, base_url="http://127.0.0.1:9")
    return model, model.name


def _stored_response(org):
    from inference.models import StoredResponse

    response_id = f"resp_{secrets.token_hex(8)}"
    row = StoredResponse.objects.create(organization=org, response_id=response_id, model_name="m", body={"id": response_id},
                                        input_items=[], history=[], expires_at=timezone.now() + timezone.timedelta(days=1))
    return row, response_id


def _file(org):
    from django.core.files.base import ContentFile

    from inference import files

    stored = files.save(org, None, ContentFile(b'{"b": "secret of b"}\n'), "b.jsonl", "batch")
    return stored, stored.file_id


def _batch(org):
    from inference.batch_models import Batch

    stored, file_id = _file(org)
    batch = Batch.objects.create(organization=org, endpoint="/v1/chat/completions", input_file=stored,
                                 input_file_name=file_id, status="in_progress", expires_at=timezone.now() + timezone.timedelta(days=1))
    return batch, batch.batch_id


def _key_and_id(org):
    key = _key(org)
    return key, key.pk


API_CASES: dict[str, list[tuple[str, Callable]]] = {
    "v1-model": [("get", _listed_model)],
    "v1-response": [("get", _stored_response), ("delete", _stored_response)],
    "v1-response-input-items": [("get", _stored_response)],
    "v1-file": [("get", _file), ("delete", _file)],
    "v1-file-content": [("get", _file)],
    "v1-batch": [("get", _batch)],
    "v1-batch-cancel": [("post", _batch)],
    "batch-file-download": [("get", _file)],  # the console's: a member's session, not a key
    "key-budget": [("post", _key_and_id)],  # the console's budgets page (an owner's session)
}
SESSION_URLS = {"batch-file-download", "key-budget"}


def test_every_api_url_with_an_id_has_an_isolation_case():
    assert api_urls_with_ids() == set(API_CASES), "add the new /v1 URL to API_CASES in this file"


@pytest.mark.django_db(transaction=True)  # the API reads on its own database threads
@pytest.mark.parametrize("name,method,make_object", [(n, m, f) for n, cases in API_CASES.items() for m, f in cases],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_key_of_org_a_gets_404_for_org_b_ids(client, settings, name, method, make_object):
    from inference.catalog import catalog

    settings.GATEWAY_ASYNC_DB = False  # the test client's event loops are short-lived: the threaded path
    settings.GATEWAY_CATALOG_CACHE_SECONDS = 0
    catalog.invalidate()
    owner_a, owner_b = make_user("api-a@example.com"), make_user("api-b@example.com")
    org_a, org_b = tenancy.create_organization(owner_a, "API A"), tenancy.create_organization(owner_b, "API B")
    Entitlement.objects.create(organization=org_a, token_quota=1000)
    _, raw_key = APIKey.objects.create_key(org_a, "a's key")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}
    if name in SESSION_URLS:
        client.force_login(owner_a)
        headers = {}
    obj, object_id = make_object(org_b)
    before = model_to_dict(obj)
    response = getattr(client, method)(reverse(name, args=[object_id]), **headers)
    assert response.status_code == 404, (name, method, response.status_code)
    assert "secret of b" not in response.content.decode()
    if name not in SESSION_URLS:
        assert "error" in response.json()
    obj.refresh_from_db()
    assert model_to_dict(obj) == before  # nothing of B's changed
    # The same request for an object of A does not 404: the 404 comes from the scoping, not the route.
    _, own_id = make_object(org_a)
    own = getattr(client, method)(reverse(name, args=[own_id]), **headers)
    assert own.status_code != 404, (name, method, own.status_code, own.content)
