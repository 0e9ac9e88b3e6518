"""All mail takes the queued path: allauth's messages included (tasks run eagerly in the test settings)."""

import uuid

import pytest
from celery.signals import task_prerun
from django.core import mail
from django.core.mail import EmailMultiAlternatives

from accounts.models import User
from maas.mail import deserialize_message, serialize_message


def test_message_round_trips_through_json():
    message = EmailMultiAlternatives("Hi", "text", "from@example.com", ["to@example.com"], cc=["cc@example.com"],
                                     reply_to=["r@example.com"], headers={"X-Tag": "1"})
    message.attach_alternative("<b>html</b>", "text/html")
    copy = deserialize_message(serialize_message(message))
    assert (copy.subject, copy.body, copy.to, copy.cc, copy.reply_to) == ("Hi", "text", ["to@example.com"], ["cc@example.com"], ["r@example.com"])
    assert copy.alternatives[0][0] == "<b>html</b>" and copy.extra_headers == {"X-Tag": "1"}


def test_attachments_are_refused_with_a_clear_error():
    message = EmailMultiAlternatives("Hi", "text", "f@example.com", ["t@example.com"])
    message.attach("a.txt", "data", "text/plain")
    with pytest.raises(ValueError, match="attachments"):
        serialize_message(message)


class Inbox:
    """aiosmtpd handler: the messages a real SMTP server received."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
        self.messages.append(envelope.content.decode())
        return "250 OK"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_send_email_task_is_retried_with_backoff_on_delivery_errors(tmp_path):
    """A real worker delivering over SMTP: the server is down (connection refused), the task is retried
    with a backoff, and once the server is up the next attempt delivers the message."""
    from aiosmtpd.controller import Controller
    from celery import Celery

    from tests.ops.test_celery_worker import BROKER, Worker, wait_for
    from tests.processes import free_port

    port, queue = free_port(), f"mail-retry-{uuid.uuid4().hex[:8]}"
    (tmp_path / "mail").mkdir()
    worker = Worker(tmp_path / "mail", tmp_path / "worker.log", queue=queue,
                    EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend", EMAIL_HOST="127.0.0.1",
                    EMAIL_PORT=str(port))
    producer = Celery("mail-retry-producer", broker=BROKER, set_as_current=False)
    inbox, controller = Inbox(), None
    try:
        subject = f"Welcome {uuid.uuid4().hex[:6]}"
        message = EmailMultiAlternatives(subject, "body", "noreply@example.com", ["user@example.com"])
        producer.send_task("accounts.tasks.send_email", args=[serialize_message(message), f"key-{subject}"],
                           queue=queue)
        wait_for(lambda: "Retry in" in worker.output(), "a retry after the refused connection")
        assert "ConnectionRefusedError" in worker.output() and not inbox.messages
        controller = Controller(inbox, hostname="127.0.0.1", port=port)
        controller.start()
        wait_for(lambda: inbox.messages, "delivery on a later attempt")
        assert len(inbox.messages) == 1 and f"Subject: {subject}" in inbox.messages[0]
        assert "succeeded" in worker.output()
    finally:
        if controller is not None:
            controller.stop()
        worker.stop()
        producer.close()


@pytest.mark.django_db
def test_allauth_password_reset_mail_goes_through_the_task(client, settings, django_capture_on_commit_callbacks):
    settings.EMAIL_BACKEND = "maas.mail.CeleryEmailBackend"
    settings.EMAIL_DELIVERY_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    User.objects.create_user("reset-me@example.com", "a-long-password-123")
    ran = []

    def record(sender=None, **kwargs):
        ran.append(sender.name)

    task_prerun.connect(record)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post("/accounts/password/reset/", {"email": "reset-me@example.com"})
    finally:
        task_prerun.disconnect(record)
    assert response.status_code == 302
    assert ran == ["accounts.tasks.send_email"]
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["reset-me@example.com"]
    assert "/accounts/password/reset/key/" in mail.outbox[0].body


@pytest.mark.django_db(transaction=True)
def test_mail_of_a_rolled_back_transaction_is_not_sent(settings):
    from django.db import transaction

    settings.EMAIL_BACKEND = "maas.mail.CeleryEmailBackend"
    settings.EMAIL_DELIVERY_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    with pytest.raises(RuntimeError), transaction.atomic():
        mail.send_mail("Invitation", "join us", "from@example.com", ["new@example.com"])
        raise RuntimeError("the invitation could not be saved")
    assert mail.outbox == []
    with transaction.atomic():
        mail.send_mail("Invitation", "join us", "from@example.com", ["new@example.com"])
        assert mail.outbox == []  # not before the commit
    assert [m.subject for m in mail.outbox] == ["Invitation"]
