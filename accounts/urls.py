from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from .views import console, keys, members, organization, redeem

app_name = "console"

urlpatterns: list = [
    path("", console.dashboard, name="dashboard"),
    path("organizations/new/", console.organization_new, name="org-new"),
    path("organizations/<int:pk>/switch/", console.organization_switch, name="org-switch"),
    path("organization/", organization.organization_settings, name="org-settings"),
    path("organization/audit/", organization.organization_audit, name="org-audit"),
    path("keys/", keys.keys, name="keys"),
    path("keys/<int:pk>/revoke/", keys.key_revoke, name="key-revoke"),
    path("keys/<int:pk>/roll/", keys.key_roll, name="key-roll"),
    path("members/", members.members, name="members"),
    path("members/invite/", members.member_invite, name="member-invite"),
    path("members/<int:pk>/role/", members.member_role, name="member-role"),
    path("members/<int:pk>/remove/", members.member_remove, name="member-remove"),
    path("invitations/<int:pk>/revoke/", members.invitation_revoke, name="invitation-revoke"),
    path("invitations/accept/<str:token>/", members.invitation_accept, name="invitation-accept"),
    path("api/keys", keys.APIKeyListView.as_view(), name="api-keys"),
    path("api/keys/<int:pk>", keys.APIKeyDetailView.as_view(), name="api-key"),
    path("api/keys/<int:pk>/roll", keys.APIKeyRollView.as_view(), name="api-key-roll"),
    path("redeem/", redeem.redeem_page, name="redeem"),
    path("api/redeem", redeem.RedeemAPIView.as_view(), name="api-redeem"),
    path("api/entitlements", redeem.EntitlementListAPIView.as_view(), name="api-entitlements"),
    path("api/entitlements/<int:pk>", redeem.EntitlementDetailAPIView.as_view(), name="api-entitlement"),
    path("api/schema", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs", SpectacularSwaggerSplitView.as_view(url_name="console:api-schema"), name="api-docs"),
]
