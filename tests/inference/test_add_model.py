"""`manage.py add_model`: adds or updates a catalog model with its deployment; bad input changes nothing."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from accounts.models import Organization
from inference.models import AIModel, Deployment, Visibility

pytestmark = pytest.mark.django_db


def test_add_then_update():
    call_command("add_model", "smollm2", "--engine-url", "http://127.0.0.1:8001/", "--display-name", "SmolLM2 135M",
                 "--context-length", "8192", "--price-input", "0.1", "--price-cached-input", "0.05",
                 "--price-output", "0.4", "--served-model-name", "SmolLM2-135M")
    model = AIModel.objects.get(name="smollm2")
    assert (model.display_name, model.context_length, model.visibility) == ("SmolLM2 135M", 8192, Visibility.ALL)
    assert model.price_output_per_million == Decimal("0.4")
    deployment = Deployment.objects.get(model=model)
    assert (deployment.base_url, deployment.served_model_name) == ("http://127.0.0.1:8001", "SmolLM2-135M")
    assert model.cost(1_000_000, 500_000, 1_000_000) == Decimal("0.05") + Decimal("0.025") + Decimal("0.4")

    org = Organization.objects.create(name="A", slug="org-a")
    call_command("add_model", "smollm2", "--engine-url", "http://127.0.0.1:8001", "--visibility", "org-a")
    model.refresh_from_db()
    assert model.visibility == Visibility.LISTED and list(model.organizations.all()) == [org]
    assert Deployment.objects.filter(model=model).count() == 1


ENGINE = ["--engine-url", "http://127.0.0.1:8001"]


@pytest.mark.parametrize(("args", "message"), [
    (["--engine-url", "ftp://x"], "Not an http(s) URL: ftp://x"),
    ([*ENGINE, "--price-input", "-1"], "Prices cannot be negative: -1"),
    ([*ENGINE, "--price-output", "cheap"], "Not a price: 'cheap'"),
    ([*ENGINE, "--visibility", "no-such-org"], "Unknown organizations: no-such-org"),
    ([*ENGINE, "--context-length", "0"], "--context-length must be positive."),
])
def test_bad_input_is_refused_and_changes_nothing(args, message):
    with pytest.raises(CommandError) as err:
        call_command("add_model", "m", *args)
    assert str(err.value) == message
    assert not AIModel.objects.exists() and not Deployment.objects.exists()


def test_tool_format_is_set_from_the_command_line():
    call_command("add_model", "hermes-model", "--engine-url", "http://127.0.0.1:8001", "--tool-format", "hermes")
    assert AIModel.objects.get(name="hermes-model").tool_format == "hermes"
    call_command("add_model", "plain", "--engine-url", "http://127.0.0.1:8001")
    assert AIModel.objects.get(name="plain").tool_format == "auto"
    with pytest.raises(CommandError):
        call_command("add_model", "bad", "--engine-url", "http://127.0.0.1:8001", "--tool-format", "xml")


def test_kind_is_set_from_the_command_line_and_decides_the_endpoints():
    call_command("add_model", "minilm", "--engine-url", "http://127.0.0.1:8101", "--kind", "embeddings")
    model = AIModel.objects.get(name="minilm")
    assert model.kind == "embeddings"
    assert model.endpoint_refusal("embeddings") is None
    assert "/v1/embeddings" in model.endpoint_refusal("chat/completions")
    call_command("add_model", "chat", "--engine-url", "http://127.0.0.1:8100")
    chat = AIModel.objects.get(name="chat")
    assert chat.kind == "chat" and chat.endpoint_refusal("completions") is None
    assert "does not serve embeddings" in chat.endpoint_refusal("embeddings")
    with pytest.raises(CommandError):
        call_command("add_model", "x", "--engine-url", "http://127.0.0.1:8100", "--kind", "rerank")
