"""Keys do not outlive their people, however a person goes: a membership deleted (console, admin,
cascade) revokes that member's keys in the organization; a user deactivated or deleted revokes all
of their member keys. Signals, not a service, because the admin and the shell change these rows too."""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver

from .keys import revoke_member_keys
from .models import Membership, User


@receiver(post_delete, sender=Membership, dispatch_uid="revoke-keys-on-membership-delete")
def membership_ended(sender, instance: Membership, **kwargs) -> None:
    revoke_member_keys(instance.user_id, instance.organization_id)


@receiver(pre_save, sender=User, dispatch_uid="remember-user-active")
def remember_active(sender, instance: User, raw=False, **kwargs) -> None:
    instance._was_active = (
        not raw and instance.pk is not None
        and User.objects.filter(pk=instance.pk, is_active=True).exists()
    )


@receiver(post_save, sender=User, dispatch_uid="revoke-keys-on-deactivation")
def user_saved(sender, instance: User, raw=False, **kwargs) -> None:
    if getattr(instance, "_was_active", False) and not instance.is_active:
        revoke_member_keys(instance.pk)


@receiver(pre_delete, sender=User, dispatch_uid="revoke-keys-on-user-delete")
def user_deleted(sender, instance: User, **kwargs) -> None:
    revoke_member_keys(instance.pk)  # before created_by is set to NULL
