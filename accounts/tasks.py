"""Background work of the accounts app: the one task that sends every email."""

from __future__ import annotations

import logging
import smtplib

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.core.mail import get_connection

from maas.mail import deserialize_message

logger = logging.getLogger(__name__)

SENT_MARKER_SECONDS = 7 * 24 * 3600


@shared_task(
    bind=True,
    acks_late=True,
    autoretry_for=(OSError, smtplib.SMTPException),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def send_email(self, message: dict, idempotency_key: str) -> bool:
    """Deliver one queued message; False when this key was already delivered (a redelivered task)."""
    marker = f"email-sent:{idempotency_key}"
    if cache.get(marker):
        logger.info("email %s already sent; skipping", idempotency_key)
        return False
    email = deserialize_message(message)
    email.connection = get_connection(settings.EMAIL_DELIVERY_BACKEND, fail_silently=False)
    email.send()
    cache.set(marker, 1, SENT_MARKER_SECONDS)
    logger.info("email %s sent to %d recipient(s)", idempotency_key, len(email.recipients()))
    return True
