"""Email goes out through one Celery task: this backend only enqueues.

EMAIL_BACKEND points here; EMAIL_DELIVERY_BACKEND (the EMAIL_BACKEND environment variable: SMTP in
production, console in development) is what the worker delivers with. Every message — allauth's
verification and password-reset mail, invitations, quota notices — takes this one path, so a slow or
failing SMTP server never blocks a web request and failed sends are retried with backoff.
"""

from __future__ import annotations

import uuid

from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.backends.base import BaseEmailBackend
from django.db import transaction


def serialize_message(message: EmailMessage) -> dict:
    """A JSON-safe description of a rendered message (attachments are not supported)."""
    if message.attachments:
        raise ValueError("Email attachments cannot be queued; send them with EMAIL_DELIVERY_BACKEND directly.")
    return {
        "subject": str(message.subject),
        "body": str(message.body),
        "from_email": message.from_email,
        "to": list(message.to),
        "cc": list(message.cc),
        "bcc": list(message.bcc),
        "reply_to": list(message.reply_to),
        "headers": dict(message.extra_headers),
        "alternatives": [[str(content), mimetype] for content, mimetype in getattr(message, "alternatives", [])],
    }


def deserialize_message(data: dict) -> EmailMultiAlternatives:
    message = EmailMultiAlternatives(
        subject=data["subject"],
        body=data["body"],
        from_email=data["from_email"],
        to=data["to"],
        cc=data["cc"],
        bcc=data["bcc"],
        reply_to=data["reply_to"],
        headers=data["headers"],
    )
    for content, mimetype in data["alternatives"]:
        message.attach_alternative(content, mimetype)
    return message


class CeleryEmailBackend(BaseEmailBackend):
    def send_messages(self, email_messages) -> int:
        from accounts.tasks import send_email

        count = 0
        for message in email_messages:
            if not message.recipients():
                continue
            # The key is fixed now, so a redelivered or retried task never sends the message twice; queued
            # when the surrounding transaction commits (at once outside one), so a rolled-back invitation
            # or sign-up sends nothing.
            payload, key = serialize_message(message), uuid.uuid4().hex
            transaction.on_commit(lambda payload=payload, key=key: send_email.delay(payload, idempotency_key=key))
            count += 1
        return count
