"""`inert`: a tenant-chosen string (an organization name) made harmless for a plain-text email.

Mail clients turn URLs, bare domains and addresses into links, and a subject or body carrying them
makes our mail a relay for someone else's message. `inert` drops control and bidirectional-override
characters, folds line breaks and runs of spaces into one space, shortens it, and defangs anything a
client would link: `scheme://` becomes `scheme[:]//`, dots in host names `[.]`, `@` `[@]`.
"""

from __future__ import annotations

import re
import unicodedata

from django import template

register = template.Library()

MAX_LENGTH = 80
SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*):/+")
HOSTNAME = re.compile(r"(?i)\b[\w-]+(?:\.[\w-]+)+\b")


def make_inert(value) -> str:
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in str(value))
    text = " ".join(text.split())
    if len(text) > MAX_LENGTH:
        text = text[: MAX_LENGTH - 1] + "…"
    text = SCHEME.sub(lambda m: f"{m.group(1)}[:]//", text)
    text = HOSTNAME.sub(lambda m: m.group(0).replace(".", "[.]"), text)
    return text.replace("@", "[@]")


register.filter("inert", make_inert)
