"""Tokenizer wrapper over the `tokenizers` library, and chat-template rendering.

The chat template is rendered the way transformers renders it (same sandboxed Jinja2 environment, same
globals and filters, same variables), so `encode(apply_chat_template(...), add_special_tokens=False)` gives
the token ids transformers' `apply_chat_template(..., tokenize=True)` gives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """Text <-> token ids, plus the model's chat template.

    `special_tokens` maps the named special tokens (bos_token, eos_token, ...) to their strings; they are
    template variables, as in transformers.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = self._token_id(self.special_tokens.get("bos_token"))
        self.eos_token_id: int | None = self._token_id(self.special_tokens.get("eos_token"))

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` with the model's chat template (raises ValueError if the model has none).

        Extra kwargs become template variables (e.g. `tools`, `documents`, `enable_thinking`); they override
        the special-token variables, as in transformers.
        """
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a completion prompt instead")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = []
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts, got {message!r}")
            # As transformers does: keys whose value is None are dropped (OpenAI clients send content=None).
            chat.append({key: value for key, value in message.items() if value is not None})
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        return compile_chat_template(self.chat_template).render(
            messages=chat, add_generation_prompt=add_generation_prompt, **variables
        )


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` block (it only marks assistant text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (as transformers' sandbox does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes ({name!r})"
            )


class _TemplateDict:
    """`dict` for templates: callable and `fromkeys`, but no class to reach through attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def select_chat_template(template: str | list | None, name: str = "default") -> str | None:
    """tokenizer_config.json may hold one template or a list of named ones; pick the default."""
    if template is None or isinstance(template, str):
        return template
    named = {entry["name"]: entry["template"] for entry in template}
    return named.get(name) or next(iter(named.values()), None)


def token_content(value) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value
