"""A real browser (headless Chromium) walks the console: sign up, verify the email from the sent message,
redeem an authorization code, create an API key and read it from the page; the key then authenticates."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import openai
import pytest
from django.core import mail
from playwright.sync_api import expect

from accounts import codes
from accounts.models import APIKey, Membership
from inference.models import AIModel
from tests.ci import CHROMIUM, IN_CI, chromium_missing
from tests.inference.conftest import start_gateway
from tests.processes import stop

from .console_helpers import *  # noqa: F403  (fixtures)

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    # In CI (CI=true) a missing browser fails instead: tests/conftest.py.
    pytest.mark.skipif(chromium_missing() and not IN_CI, reason="Chromium is installed by `make services` (.ci/services)"),
]


@pytest.fixture
def browser_page(tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the ORM calls the test makes between
    # browser steps are still synchronous and never run concurrently with it.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")

    with sync_playwright() as p:
        # A fresh profile every run: Playwright takes it as user_data_dir (it refuses --user-data-dir in args).
        context = p.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.set_default_timeout(45_000)  # the shared 2-core machine can be slow
        try:
            yield page
        finally:
            context.close()


def wait_for_mail(count: int, timeout: float = 30.0) -> mail.EmailMessage:
    deadline = time.monotonic() + timeout
    while len(mail.outbox) < count:
        assert time.monotonic() < deadline, "no email was sent"
        time.sleep(0.05)
    return mail.outbox[count - 1]


def test_sign_up_verify_redeem_create_key(live_server, browser_page, tmp_path):
    try:
        walk_the_console(live_server, browser_page, tmp_path)
    except BaseException:
        # Shown by pytest on failure: where the browser was and what it saw.
        print("URL:", browser_page.url)
        print(browser_page.content()[:5000])
        raise


def walk_the_console(live_server, page, tmp_path):
    email, password = "browser.user@example.com", "a-long-browser-password-31"

    page.goto(f"{live_server.url}/accounts/signup/")
    page.get_by_label("Email").fill(email)
    page.locator("#id_password1").fill(password)
    page.locator("#id_password2").fill(password)
    page.get_by_role("button", name="Sign Up").click()
    page.wait_for_url(re.compile(r"/accounts/confirm-email/$"))

    message = wait_for_mail(1)
    assert message.to == [email]
    link = re.search(r"https?://\S+/accounts/confirm-email/\S+/", message.body).group(0)
    page.goto(link)
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_url(f"{live_server.url}/")
    assert page.get_by_role("heading", name="No active entitlement").is_visible()
    org = Membership.objects.get(user__email=email).organization

    raw_code = codes.issue_codes(1, token_quota=50_000, validity_days=30, model_names=["smollm2-135m"])[0].raw
    page.get_by_role("link", name="Redeem code").click()
    page.get_by_label("Authorization code").fill(raw_code)
    page.get_by_role("button", name=re.compile("Redeem")).click()
    page.get_by_text("Code redeemed").wait_for()

    page.get_by_role("link", name="Dashboard").click()
    assert page.get_by_text("50,000 tokens").first.is_visible()
    assert page.get_by_text("smollm2-135m").is_visible()
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    shot = tmp_path / "dashboard-phone.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    if os.environ.get("CONSOLE_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["CONSOLE_SCREENSHOT_DIR"]) / shot.name)
    page.set_viewport_size({"width": 1280, "height": 900})

    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Name").fill("browser key")
    page.get_by_label("Allowed models").fill("smollm2-135m")
    page.get_by_role("button", name="Create key").click()
    revealed = page.locator("#new-key")
    raw_key = revealed.input_value()
    assert raw_key.startswith("sk-")
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("#copy-status")).to_have_text(re.compile(r"Copied|Press Ctrl"))
    if os.environ.get("CONSOLE_SCREENSHOT_DIR"):  # for a person to look at the phone layout of the key table
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(Path(os.environ["CONSOLE_SCREENSHOT_DIR"]) / "keys-phone.png"), full_page=True)

    key = APIKey.objects.get_by_raw(raw_key)
    assert key is not None and key.is_usable()
    assert key.organization == org and key.name == "browser key" and key.allowed_models == ["smollm2-135m"]
    assert key.created_by.email == email

    page.reload()  # re-posts the form: no second key, and the key is never shown again
    page.get_by_text("already created").wait_for()
    assert page.locator("#new-key").count() == 0 and raw_key not in page.content()
    assert APIKey.objects.for_org(org).count() == 1

    # The key from the page authenticates at the gateway's /v1 and sees the model its code and allowlist grant.
    AIModel.objects.create(name="smollm2-135m")
    AIModel.objects.create(name="other-model")
    url, gateway = start_gateway()
    try:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0, timeout=30)
        assert [m.id for m in api.models.list()] == ["smollm2-135m"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key[:-1] + "0", max_retries=0).models.list()
    finally:
        stop(gateway)
