"""Secrets the control plane must read back (external upstreams' API keys), encrypted at rest with
Fernet (AES-128-CBC with HMAC-SHA256) under a key derived from DEPLOYMENT_KEY_SECRET."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings


def _fernet() -> Fernet:
    digest = hashlib.sha256(b"maas-deployment-key:" + settings.DEPLOYMENT_KEY_SECRET.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt(plain: str) -> str:
    return _fernet().encrypt(plain.encode()).decode()


def decrypt(token: str) -> str:
    """The plain text; empty when it was encrypted under another secret (the key must be typed again)."""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        return ""
