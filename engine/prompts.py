"""A request's prompt as token ids: chat messages through the model's chat template (tools as the tool
format says) or a completion prompt.

The engine server builds every prompt with it, and the gateway builds the same one from the tokenizer the
engine publishes (`GET /v1/tokenizer`, `PromptBuilder.published`), so the gateway's quota hold counts
exactly the tokens the engine will see. Neither torch nor Django is imported here.
"""

from __future__ import annotations

from tokenizers import Tokenizer as BackendTokenizer

from engine import tools
from engine.tokenizer import Tokenizer


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, tool_format: str = "auto"):
        self.tokenizer = tokenizer
        self.tool_format = tool_format  # the default; a request's `tool_format` wins

    def native_tools(self, tool_format: str | None) -> bool:
        """Whether tools go to the chat template (tool format "auto" and a template that supports them)."""
        return ((tool_format or self.tool_format) == "auto"
                and tools.template_supports_tools(self.tokenizer.chat_template))

    def chat_ids(self, messages: list[dict], tool_defs: list[dict] | None, tool_format: str | None) -> list[int]:
        """The rendered conversation's ids; a template that fails on these messages raises ValueError."""
        messages, kwargs = tools.render(messages, tool_defs, native=self.native_tools(tool_format))
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's messages
            raise ValueError(f"cannot apply the chat template: {exc}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def published(self) -> dict:
        """What `GET /v1/tokenizer` sends: enough to rebuild this builder elsewhere."""
        tokenizer = self.tokenizer
        return {"tokenizer": tokenizer.backend.to_str(), "special_tokens": tokenizer.special_tokens,
                "chat_template": tokenizer.chat_template, "tool_format": self.tool_format}

    @classmethod
    def from_published(cls, data: dict) -> PromptBuilder:
        tokenizer = Tokenizer(BackendTokenizer.from_str(data["tokenizer"]), special_tokens=data["special_tokens"],
                              chat_template=data["chat_template"])
        return cls(tokenizer, data["tool_format"])
