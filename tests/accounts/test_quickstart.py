"""The quickstart: the "Get started" page and the key reveal show the base URL and snippets with the
organization's first allowed model, and the snippets work as pasted: the Python one with the real
`openai` client and the curl one with curl, in subprocesses, against a real gateway and upstream."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys

import httpx
import pytest
from django.test import Client

from accounts.codes import issue_codes, redeem
from accounts.models import APIKey
from inference.catalog import catalog
from inference.models import AIModel, Deployment, UsageRecord
from tests.inference.conftest import stub_upstream  # noqa: F401  (fixture)
from tests.processes import stop

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import make_org, make_user, start_console_gateway

pytestmark = [pytest.mark.django_db(transaction=True)]


def snippet(page: str, name: str) -> str:
    found = re.search(rf'<pre class="code[^"]*" id="qs-{name}"[^>]*>(.*?)</pre>', page, re.S)
    assert found, f"no {name} snippet"
    return html.unescape(found.group(1))


@pytest.fixture
def gateway_url(django_db_setup):
    url, process = start_console_gateway()
    yield url
    stop(process)


@pytest.mark.slow
def test_pasted_python_and_curl_snippets_work_against_the_gateway(gateway_url, stub_upstream, tmp_path):  # noqa: F811
    model = AIModel.objects.create(name="stub-model")
    Deployment.objects.create(model=model, base_url=stub_upstream)
    user = make_user("starter@example.com")
    org = make_org(user, "starter")
    redeem(org, issue_codes(1, token_quota=10_000)[0].raw, user)
    key, raw_key = APIKey.objects.create_key(org, "quickstart", created_by=user)
    client = Client()
    client.force_login(user)
    page = httpx.get(f"{gateway_url}/get-started/", cookies={"sessionid": client.cookies["sessionid"].value})
    assert page.status_code == 200
    python, curl = snippet(page.text, "python"), snippet(page.text, "curl")
    assert f'base_url="{gateway_url}/v1"' in python and 'model="stub-model"' in python

    env = {**os.environ, "MAAS_API_KEY": raw_key}
    script = tmp_path / "hello.py"
    script.write_text(python)
    ran = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("Hello from the stub upstream")
    curled = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, text=True, timeout=60)
    assert curled.returncode == 0, curled.stderr
    assert curled.stdout and '"chat.completion"' in curled.stdout
    assert UsageRecord.objects.filter(api_key=key, status="ok").count() == 2

    javascript = tmp_path / "hello.mjs"
    javascript.write_text(snippet(page.text, "javascript"))
    checked = subprocess.run(["node", "--check", str(javascript)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr  # valid JavaScript (the openai package is not installed here)


def test_get_started_without_entitlement_says_to_redeem_and_leaves_a_placeholder(client_a):
    page = client_a.get("/get-started/").content.decode()
    assert "cannot call any model yet" in page and "Redeem an authorization code" in page
    assert 'model="MODEL_NAME"' in html.unescape(page)
    assert 'base_url="http://testserver/v1"' in html.unescape(page)


def test_get_started_uses_api_base_url_when_set(client_a, org_a, settings):
    settings.API_BASE_URL = "https://api.example.com/v1"
    AIModel.objects.create(name="zeta")
    AIModel.objects.create(name="alpha")
    redeem(org_a, issue_codes(1)[0].raw, org_a.memberships.first().user)
    catalog.invalidate()
    page = client_a.get("/get-started/").content.decode()
    assert "curl https://api.example.com/v1/chat/completions" in snippet(page, "curl")
    assert 'model="alpha"' in snippet(page, "python")  # the first allowed model


def test_key_reveal_shows_snippets_for_a_model_the_key_may_call(client_a, org_a):
    AIModel.objects.create(name="alpha")
    AIModel.objects.create(name="beta")
    redeem(org_a, issue_codes(1)[0].raw, org_a.memberships.first().user)
    catalog.invalidate()
    page = client_a.post("/keys/", {"name": "beta only", "allowed_models": "beta", "submission": "n1"}).content.decode()
    raw_key = re.search(r'id="new-key"[^>]*value="([^"]+)"', page).group(1)
    assert f'export MAAS_API_KEY="{raw_key}"' in html.unescape(page)
    assert 'model="beta"' in snippet(page, "python") and raw_key not in snippet(page, "python")
    again = client_a.get("/keys/").content.decode()
    assert raw_key not in again and 'id="qs-python"' not in again  # shown once, with the key
