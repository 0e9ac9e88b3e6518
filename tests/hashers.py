"""A password hasher for the test run: Django's PBKDF2-SHA256 with few iterations.

Every fixture that makes a user hashes a password; at the production iteration count that is most of a
database test's setup (about a second each on the CI machine). The hash keeps the `pbkdf2_sha256` format with
its iteration count in it, so a platform process running the production settings (tests/processes.py)
still verifies it."""

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1_000
