"""Single sign-on settings read from the environment: one OpenID Connect provider per deployment (allauth's
generic `openid_connect` provider) and the email domains whose people join an organization.

Imported by maas/settings.py before apps load, so it touches no model; the tests build their settings
with the same functions."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

ROLES = ("owner", "admin", "member")  # accounts.models.Role.values (a test keeps them equal)


def oidc_providers(env: Mapping[str, str]) -> dict:
    """SOCIALACCOUNT_PROVIDERS: the one OIDC app when SSO_OIDC_SERVER_URL and SSO_OIDC_CLIENT_ID are set,
    none (no button, /accounts/oidc/... answers 404) when both are unset."""
    server_url = env.get("SSO_OIDC_SERVER_URL", "").strip()
    client_id = env.get("SSO_OIDC_CLIENT_ID", "").strip()
    if not server_url and not client_id:
        return {"openid_connect": {"APPS": []}}
    if not server_url or not client_id:
        raise ImproperlyConfigured("SSO needs both SSO_OIDC_SERVER_URL and SSO_OIDC_CLIENT_ID (or neither).")
    if urlsplit(server_url).scheme not in ("http", "https") or not urlsplit(server_url).netloc:
        raise ImproperlyConfigured(f"SSO_OIDC_SERVER_URL is not an http(s) URL: {server_url!r}")
    app_settings = {"server_url": server_url, "oauth_pkce_enabled": True}
    if env.get("SSO_OIDC_TOKEN_AUTH_METHOD"):
        app_settings["token_auth_method"] = env["SSO_OIDC_TOKEN_AUTH_METHOD"]
    app = {
        "provider_id": env.get("SSO_OIDC_PROVIDER_ID", "").strip() or "sso",
        "name": env.get("SSO_OIDC_PROVIDER_NAME", "").strip() or "SSO",
        "client_id": client_id,
        "secret": env.get("SSO_OIDC_CLIENT_SECRET", ""),
        "settings": app_settings,
    }
    return {"openid_connect": {"APPS": [app], "SCOPE": ["openid", "profile", "email"]}}


def provider_origins(providers: dict) -> list[str]:
    """Origins of the configured providers: the Content-Security-Policy's form-action must admit them,
    since "Continue" posts to the console, which redirects the form submission to the provider."""
    origins = []
    for app in providers.get("openid_connect", {}).get("APPS", []):
        parts = urlsplit(app["settings"]["server_url"])
        origins.append(f"{parts.scheme}://{parts.netloc}")
    return origins


def domain_organizations(value: str) -> dict[str, dict[str, str]]:
    """SSO_DOMAIN_ORGANIZATIONS="example.com=acme:member,corp.example=corp" → {domain: {organization
    slug, role}}; the role defaults to member."""
    mapping: dict[str, dict[str, str]] = {}
    for entry in (item.strip() for item in value.split(",")):
        if not entry:
            continue
        domain, _, target = entry.partition("=")
        slug, _, role = target.partition(":")
        domain, slug, role = domain.strip().lower().lstrip("@"), slug.strip(), role.strip().lower() or "member"
        if not domain or not slug:
            raise ImproperlyConfigured(f"SSO_DOMAIN_ORGANIZATIONS entry {entry!r} is not domain=organization[:role].")
        if role not in ROLES:
            raise ImproperlyConfigured(f"SSO_DOMAIN_ORGANIZATIONS entry {entry!r}: role must be one of {ROLES}.")
        mapping[domain] = {"organization": slug, "role": role}
    return mapping
