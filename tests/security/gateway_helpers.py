"""Does the gateway's own admission (inference.quotas.admit, the code every /v1 request runs) accept a key?"""

from __future__ import annotations

from accounts.models import Entitlement, Organization
from inference import quotas
from inference.errors import GatewayError


def entitle(org: Organization) -> Entitlement:
    return Entitlement.objects.create(organization=org, token_quota=None)


def gateway_admits(raw_key: str) -> bool:
    """True when the key is admitted; False on the gateway's 401 (revoked, expired, unknown)."""
    try:
        quotas.admit(raw_key)
    except GatewayError as exc:
        assert exc.status == 401, exc
        return False
    return True
