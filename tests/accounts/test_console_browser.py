"""Headless Chromium against a real gateway process (uvicorn, so answers stream) and the real engine
(SmolLM2): sign up, confirm the email, redeem a code, see the model on the models page (degraded once a
second replica fails its health check), chat in the playground (the answer grows token by token; Stop
cuts a long one), and find the same numbers in the request log and usage.
Screenshots of each page at desktop and phone width go to CONSOLE_SCREENSHOT_DIR (default /tmp/console-shots)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect

from accounts import codes
from accounts.models import Membership, User
from inference import files as batch_files
from inference.batch_models import Batch
from inference.catalog import check_deployments
from inference.models import AIModel, Deployment, UsageRecord, UsageSource, UsageStatus
from tests.inference.conftest import add_model, engine_server  # noqa: F401  (fixture)
from tests.processes import free_port, stop

from . import test_browser
from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import start_console_gateway

browser_page = test_browser.browser_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(test_browser.CHROMIUM).exists(), reason="Chromium is installed by `make services`"),
]

SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOT_DIR", "/tmp/console-shots"))
DESKTOP, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}
WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""
# Every text the assistant's turn shows while it streams, in order.
RECORD_GROWTH = """
window.__growth = [];
new MutationObserver(() => {
  const turns = document.querySelectorAll('#pg-transcript .turn-assistant .turn-content');
  if (turns.length) window.__growth.push(turns[turns.length - 1].textContent);
}).observe(document.getElementById('pg-transcript'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture
def console(django_db_setup, tmp_path):
    """The whole platform in one uvicorn process, mail written to files the test reads."""
    mail_dir = tmp_path / "mail"
    url, process = start_console_gateway(EMAIL_BACKEND="django.core.mail.backends.filebased.EmailBackend",
                                 EMAIL_FILE_PATH=str(mail_dir))
    # localhost, not 127.0.0.1: a secure context for the browser, so Secure cookies are kept over http.
    yield url.replace("127.0.0.1", "localhost"), mail_dir
    stop(process)


def shoot(page, name: str) -> None:
    """Full-page screenshots at desktop and phone width; the page must fit the phone's width and have
    raised no Content-Security-Policy violation."""
    assert page.evaluate("window.__csp") == [], name
    SHOTS.mkdir(parents=True, exist_ok=True)
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        # Charts follow the new width through a ResizeObserver callback, which a loaded machine may run
        # late: wait (boundedly) for the layout to fit, then assert it does.
        fits = f"document.documentElement.scrollWidth <= {size['width']}"
        with contextlib.suppress(PlaywrightTimeout):
            page.wait_for_function(fits, timeout=5000)
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= size["width"], f"{name} overflows at {label}"
    page.set_viewport_size(DESKTOP)


def confirmation_link(mail_dir: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in sorted(mail_dir.glob("*")) if mail_dir.exists() else []:
            found = re.search(r"https?://\S+/accounts/confirm-email/\S+/", message.read_text())
            if found:
                return found.group(0)
        time.sleep(0.1)
    raise AssertionError("no confirmation email")


def test_sign_up_redeem_and_chat_in_the_playground(console, engine_server, browser_page):  # noqa: F811
    try:
        walk(console, engine_server, browser_page)
    except BaseException:
        print("URL:", browser_page.url)
        print(browser_page.content()[:5000])
        raise


def walk(console, engine_url, page):
    base, mail_dir = console
    add_model("smollm2", engine_url, context_length=2048, description="SmolLM2 135M Instruct, for trying things.",
              price_input_per_million=1, price_cached_input_per_million="0.5", price_output_per_million=4)
    page.add_init_script(WATCH)
    email, password = "player.one@example.com", "a-long-browser-password-77"

    page.goto(f"{base}/accounts/signup/")
    page.get_by_label("Email").fill(email)
    page.locator("#id_password1").fill(password)
    page.locator("#id_password2").fill(password)
    page.get_by_role("button", name="Sign Up").click()
    page.wait_for_url(re.compile(r"/accounts/confirm-email/$"))
    page.goto(confirmation_link(mail_dir).replace("127.0.0.1", "localhost"))
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_url(f"{base}/")
    org = Membership.objects.get(user__email=email).organization

    raw_code = codes.issue_codes(1, token_quota=50_000, validity_days=30, model_names=["smollm2"])[0].raw
    page.get_by_role("link", name="Redeem code").click()
    page.get_by_label("Authorization code").fill(raw_code)
    page.get_by_role("button", name=re.compile("Redeem")).click()
    page.get_by_text("Code redeemed").wait_for()

    page.get_by_role("link", name="Models", exact=True).click()
    card = page.locator('[data-model="smollm2"]')
    expect(card.locator(".status")).to_have_text("Up")
    expect(card).to_contain_text("2,048 tokens")
    expect(card.locator('[data-price="output"]')).to_have_text("4 per 1M tokens")
    expect(card.locator('[data-price="cached_input"]')).to_have_text("0.5 per 1M tokens")
    shoot(page, "models")

    # A second replica that is not running: the next health check takes it down, the model is degraded.
    Deployment.objects.create(model=AIModel.objects.get(name="smollm2"), base_url=f"http://127.0.0.1:{free_port()}")
    assert check_deployments() == {"healthy": 1, "unhealthy": 1}
    page.reload()
    expect(card.locator(".status")).to_have_text("Degraded")
    expect(card).to_contain_text("Some replicas failed their last health check")

    page.get_by_role("link", name="Get started").click()
    expect(page.locator("#qs-model")).to_have_text("smollm2")
    expect(page.locator("#qs-base-url")).to_have_text(f"{base}/v1")
    page.get_by_role("tab", name="Python").click()
    expect(page.locator("#qs-python")).to_be_visible()
    expect(page.locator("#qs-curl")).to_be_hidden()
    shoot(page, "get-started")

    page.get_by_role("link", name="Models", exact=True).click()
    card.get_by_role("link", name="Try it in the playground").click()
    expect(page.get_by_label("Model")).to_have_value("smollm2")
    page.evaluate(RECORD_GROWTH)
    page.get_by_label("System prompt").fill("You answer briefly.")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Your message").fill("Count from 1 to 20, separated by spaces.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-status")).to_have_text(re.compile(r"^Done"), timeout=120_000)

    growth = [text for text in page.evaluate("window.__growth") if text]
    answer = page.locator("#pg-transcript .turn-assistant .turn-content").last.text_content()
    assert answer and growth[-1] == answer
    assert len(set(growth)) >= 3, growth  # it grew token by token, not all at once
    assert all(later.startswith(earlier) for earlier, later in zip(growth, growth[1:], strict=False)), growth

    request_id = page.locator("#pg-request-id").text_content()
    record = UsageRecord.objects.get(request_id=request_id)
    assert record.source == UsageSource.PLAYGROUND and record.api_key is None and record.organization == org
    assert record.user.email == email and record.status == UsageStatus.OK and record.stream
    assert page.locator("#pg-usage").text_content() == (
        f"{record.prompt_tokens} prompt + {record.completion_tokens} completion = {record.total_tokens}")
    assert re.fullmatch(r"\d+ ms", page.locator("#pg-ttft").text_content())
    assert re.fullmatch(r"\d+ ms", page.locator("#pg-latency").text_content())

    page.locator("#pg-code summary").click()
    curl = page.locator("#code-curl").text_content()
    assert f"curl {base}/v1/chat/completions" in curl and '"model": "smollm2"' in curl and "$MAAS_API_KEY" in curl
    page.get_by_role("tab", name="Python").click()
    python = page.locator("#code-python").text_content()
    assert f'OpenAI(base_url="{base}/v1"' in python and 'model="smollm2"' in python and "sk-" not in python
    page.get_by_role("tab", name="JavaScript").click()
    assert "new OpenAI({ baseURL:" in page.locator("#code-javascript").text_content()
    assert "Hello!" not in curl  # with the message box empty it shows the request just sent
    shoot(page, "playground")

    page.get_by_label("Max tokens").fill("600")
    page.get_by_label("Your message").fill("Write a long story about a lighthouse keeper.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-transcript .turn-assistant .turn-content").last).not_to_have_text("", timeout=120_000)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#pg-status")).to_have_text("Stopped")
    deadline = time.monotonic() + 30
    while not UsageRecord.objects.filter(status=UsageStatus.CLIENT_DISCONNECTED).exists():
        assert time.monotonic() < deadline, "the stopped request was not recorded"
        time.sleep(0.2)
    stopped = UsageRecord.objects.get(status=UsageStatus.CLIENT_DISCONNECTED)
    assert stopped.source == UsageSource.PLAYGROUND and 0 < stopped.completion_tokens < 600

    page.get_by_role("link", name="Requests").click()
    row = page.locator(f'tr[data-request-id="{record.request_id}"]')
    expect(row).to_contain_text("Playground")
    expect(row.locator(".tokens")).to_have_text(f"{record.prompt_tokens} / {record.completion_tokens}")
    expect(row).to_contain_text(f"{record.latency_ms:.0f} ms")
    expect(page.locator(f'tr[data-request-id="{stopped.request_id}"]')).to_contain_text("Client disconnected")
    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("tr[data-request-id]")).to_have_count(1)
    shoot(page, "requests")

    # Batches: the organization's batches with their counts and files, downloadable from the console.
    answer = b'{"id": "batch_req_1", "custom_id": "a", "response": {"status_code": 200}, "error": null}\n'
    source = batch_files.save(org, None, ContentFile(b'{"custom_id": "a"}\n'), "requests.jsonl", "batch")
    batch = Batch.objects.create(organization=org, endpoint="/v1/chat/completions", input_file=source,
                                 input_file_name=source.file_id, output_file=batch_files.save_output(org, "out.jsonl", answer, None),
                                 status="completed", total=1, completed=1, model_name="smollm2",
                                 expires_at=timezone.now() + timedelta(days=1))
    page.get_by_role("link", name="Batches").click()
    row = page.locator(f'tr[data-batch-id="{batch.batch_id}"]')
    expect(row.locator(".counts")).to_have_text("1 / 0 / 1")
    expect(row.locator("[data-status]")).to_have_text("Completed")
    with page.expect_download() as download:
        row.get_by_role("link", name="Output").click()
    assert Path(download.value.path()).read_bytes() == answer
    expect(page.locator(f'tr[data-file-id="{source.file_id}"]')).to_contain_text("requests.jsonl")
    shoot(page, "batches")

    page.get_by_role("link", name="Usage").click()
    records = list(UsageRecord.objects.for_org(org))
    assert len(records) == 2
    totals = page.locator("#usage-totals").locator("xpath=..")
    expect(totals).to_contain_text(f"{sum(r.completion_tokens for r in records):,}")
    expect(totals).to_contain_text(f"{sum(r.prompt_tokens for r in records):,}")
    expect(page.locator("html")).to_have_attribute("data-charts", "drawn")
    for chart in ("tokens", "cost", "requests", "latency", "keys"):  # Chart.js drew into each canvas
        assert page.evaluate(f"Chart.getChart('chart-{chart}').data.datasets.length") >= 1, chart
    assert page.evaluate("Chart.getChart('chart-tokens').data.datasets[0].data.reduce((a, b) => a + b, 0)") == sum(
        r.total_tokens for r in records)
    assert page.evaluate("Chart.getChart('chart-keys').data.labels") == ["Playground"]
    page.locator("#chart-tokens").hover()  # a tooltip in the screenshot
    shoot(page, "usage")

    page.get_by_role("link", name="Playground").click()  # JSON mode, a schema and tools reach the request
    page.get_by_label("Response format").select_option("json_schema")
    page.get_by_label("Tools").fill('[{"type": "function", "function": {"name": "get_weather", "parameters": '
                                    '{"type": "object", "properties": {"city": {"type": "string"}}}}}]')
    page.locator("#pg-code summary").click()
    curl = page.locator("#code-curl").text_content()
    assert '"type": "json_schema"' in curl and '"required": [' in curl and '"name": "get_weather"' in curl
    page.get_by_label("Tools").fill("[not json")
    page.get_by_label("Your message").fill("Hi")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-error")).to_contain_text("Tools is not valid JSON")

    page.get_by_role("navigation", name="Console").get_by_role("link", name="API keys").click()
    page.locator("#id_name").fill("first key")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#qs-export")).to_contain_text('export MAAS_API_KEY="sk-')
    expect(page.locator("#qs-curl")).to_contain_text('"model": "smollm2"')
    shoot(page, "key-reveal")

    User.objects.filter(email=email).update(is_staff=True)
    page.goto(f"{base}/")
    page.get_by_role("link", name="Operator").click()
    expect(page.locator("#op-replicas").locator("xpath=..")).to_contain_text("unhealthy")
    expect(page.locator("#op-replicas").locator("xpath=..")).to_contain_text("ConnectError")
    expect(page.locator("#op-days").locator("xpath=..").locator(".tokens").first).to_have_text(
        f"{sum(r.total_tokens for r in records):,}")
    shoot(page, "operator")
    assert page.evaluate("window.__csp") == []
