"""The Responses API on top of chat completions: request validation, the chat request a
response is generated with, the response object, and its storage per organization.

A create becomes one chat completion on the model's engine (same gateway path: hold, settlement, one
usage record with `endpoint: "responses"`); the answer is turned into a Response object and, unless
`store` is false, kept in PostgreSQL for RESPONSES_RETENTION_DAYS so that `GET`, `DELETE` and
`previous_response_id` find it. Another organization's id is a 404, as is an expired one.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Annotated, Any, Literal

from django.conf import settings
from django.utils import timezone
from pydantic import Field, ValidationError

from engine import schema
from engine.sampling_params import MaxTokens, Temperature, TopP

from .errors import GatewayError
from .models import StoredResponse
from .validation import InferenceRequest, parse_chat


class InputText(schema._Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None


class InputMessage(schema._Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputText], Field(min_length=1)]
    id: str | None = None
    status: str | None = None

    def chat(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}

    def item(self) -> dict:
        """The input item as the API lists it back."""
        parts = ([{"type": "input_text", "text": self.content}] if isinstance(self.content, str)
                 else [p.model_dump(exclude_none=True) for p in self.content])
        return {"type": "message", "role": self.role, "content": parts}


class FunctionCallItem(schema._Strict):
    """A `function_call` the model made (an earlier output item, sent back as input)."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str
    id: str | None = None
    status: str | None = None

    def tool_call(self) -> dict:
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def item(self) -> dict:
        return {"type": "function_call", "call_id": self.call_id, "name": self.name, "arguments": self.arguments,
                "status": "completed"}


class FunctionCallOutputItem(schema._Strict):
    """The caller's result of a function call: a `tool` message in the chat conversation."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str
    id: str | None = None
    status: str | None = None

    def chat(self) -> dict:
        return {"role": "tool", "tool_call_id": self.call_id, "content": self.output}

    def item(self) -> dict:
        return {"type": "function_call_output", "call_id": self.call_id, "output": self.output,
                "status": "completed"}


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem


def chat_messages(items: list[InputItem]) -> list[dict]:
    """Input items as chat messages; consecutive function calls are one assistant message's tool_calls."""
    messages: list[dict] = []
    for item in items:
        if isinstance(item, FunctionCallItem):
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(item.tool_call())
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [item.tool_call()]})
        else:
            messages.append(item.chat())
    return messages


class FunctionTool(schema._Strict):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self) -> dict:
        function = self.model_dump(exclude_none=True, exclude={"type"})
        return {"type": "function", "function": function}

    def echo(self) -> dict:
        """As the Response object lists it (FunctionTool: parameters and strict always present)."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict if self.strict is not None else True}


class NamedFunctionChoice(schema._Strict):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]


class TextFormat(schema._Strict):
    """`text.format`: free text, any JSON object, or JSON matching `schema` (chat's response_format)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> dict | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema_,
                                                       **({"strict": self.strict} if self.strict is not None else {})}}

    def check(self) -> None:
        for field, value in (("name", self.name), ("schema", self.schema_)):
            if self.type == "json_schema" and value is None:
                raise GatewayError(400, f"Missing required parameter: 'text.format.{field}'.", "invalid_request_error",
                                   "missing_required_parameter", f"text.format.{field}")


class TextConfig(schema._Strict):
    format: TextFormat | None = None


class ResponsesRequest(schema._Strict):
    model: Annotated[str, Field(min_length=1)]
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    previous_response_id: Annotated[str, Field(min_length=1)] | None = None
    store: bool | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: TextConfig | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    user: str | None = None
    stream: bool | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    def messages(self) -> list[InputItem]:
        if isinstance(self.input, str):
            return [InputMessage(role="user", content=self.input)]
        return list(self.input)

    def chat_tool_choice(self) -> str | dict | None:
        if isinstance(self.tool_choice, NamedFunctionChoice):
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        return self.tool_choice

    def echo_tool_choice(self) -> str | dict:
        if isinstance(self.tool_choice, NamedFunctionChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice or "auto"


# What a union-typed field must be, in the Responses API's terms.
SHAPES = {
    "input": "a non-empty string or a non-empty array of input items (messages, function_call, "
             "function_call_output)",
    "tool_choice": "'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
}


def parse(body: Any) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_type")
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        error = schema._request_error(exc)
        message = error.message
        if error.code == "invalid_type" and error.param in SHAPES:  # chat's wording names chat's shapes
            message = f"'{error.param}' must be {SHAPES[error.param]}."
        raise GatewayError(400, message, "invalid_request_error", error.code, error.param) from None
    if request.text is not None and request.text.format is not None:
        request.text.format.check()
    return request


def chat_request(request: ResponsesRequest, history: list[dict]) -> InferenceRequest:
    """The chat completion that generates the response: instructions, the stored conversation, the input."""
    messages = ([{"role": "system", "content": request.instructions}] if request.instructions else [])
    messages += history + chat_messages(request.messages())
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    text_format = request.text.format if request.text and request.text.format else None
    for name, value in (("max_completion_tokens", request.max_output_tokens), ("temperature", request.temperature),
                        ("top_p", request.top_p), ("user", request.user),
                        ("response_format", text_format.response_format() if text_format else None),
                        ("tools", [t.chat() for t in request.tools] if request.tools else None),
                        ("tool_choice", request.chat_tool_choice() if request.tools else None),
                        ("parallel_tool_calls", request.parallel_tool_calls if request.tools else None)):
        if value is not None:
            body[name] = value
    if request.stream:  # the usage chunk is what `response.completed` reports
        body.update(stream=True, stream_options={"include_usage": True})
    inference = parse_chat(body)
    inference.usage_endpoint = "responses"
    return inference


def output_message(text: str, message_id: str, status: str) -> dict:
    """The assistant message output item (`status`: in_progress, completed or incomplete)."""
    content = [] if status == "in_progress" else [output_text(text)]
    return {"type": "message", "id": message_id, "status": status, "role": "assistant", "content": content}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(request: ResponsesRequest, chat: dict, response_id: str, created_at: int) -> dict:
    """OpenAI's Response object for a chat completion's answer."""
    choice = chat["choices"][0]
    incomplete = choice.get("finish_reason") == "length"
    calls = choice["message"].get("tool_calls") or []
    output = [function_call(call) for call in calls]
    if choice["message"].get("content") or not calls:
        output.insert(0, output_message(choice["message"].get("content") or "", f"msg_{uuid.uuid4().hex}",
                                        "incomplete" if incomplete else "completed"))
    return {
        **response_shell(request, response_id, created_at, "incomplete" if incomplete else "completed"),
        "completed_at": None if incomplete else int(time.time()),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output, "usage": usage_object(chat.get("usage") or {}),
    }


def function_call(call: dict) -> dict:
    """A chat tool call as a `function_call` output item (its `call_id` is the chat tool call's id)."""
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


def assistant_turn(output: list[dict]) -> dict:
    """The output items as the assistant message a continuation sends back to the model."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def usage_object(usage: dict) -> dict:
    """A chat completion's usage in the Responses API's names."""
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": int((usage.get("prompt_tokens_details") or {})
                                                          .get("cached_tokens") or 0),
                                     "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def response_shell(request: ResponsesRequest, response_id: str, created_at: int, status: str) -> dict:
    """The Response object without its output: what a stream's `response.created` carries."""
    return {
        "id": response_id, "object": "response", "created_at": created_at, "completed_at": None,
        "status": status, "error": None, "incomplete_details": None, "output": [],
        "model": request.model, "instructions": request.instructions,
        "previous_response_id": request.previous_response_id, "max_output_tokens": request.max_output_tokens,
        "temperature": request.temperature if request.temperature is not None else 1.0,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "parallel_tool_calls": request.parallel_tool_calls is not False, "tool_choice": request.echo_tool_choice(),
        "tools": [t.echo() for t in request.tools or []], "text": {"format": text_format(request)}, "truncation": "disabled",
        "store": request.store is not False, "metadata": request.metadata or {},
        **({"user": request.user} if request.user is not None else {}),
    }


def text_format(request: ResponsesRequest) -> dict:
    if request.text is None or request.text.format is None:
        return {"type": "text"}
    return request.text.format.model_dump(by_alias=True, exclude_none=True)


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


# -- storage (services and selectors; the views run them on a worker thread) ------------------------
def not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"Response with id '{response_id}' not found.", "invalid_request_error", None,
                        "response_id")


def stored(organization_id: int, response_id: str) -> StoredResponse:
    """The organization's unexpired stored response, or 404 (whoever else's it is)."""
    found = (StoredResponse.objects.filter(organization_id=organization_id, response_id=response_id,
                                           expires_at__gt=timezone.now()).first())
    if found is None:
        raise not_found(response_id)
    return found


def history_of(organization_id: int, response_id: str | None) -> list[dict]:
    if response_id is None:
        return []
    return stored(organization_id, response_id).history


def store(organization_id: int, api_key_id: int | None, request: ResponsesRequest, body: dict,
          history: list[dict]) -> StoredResponse:
    return StoredResponse.objects.create(
        organization_id=organization_id, api_key_id=api_key_id, response_id=body["id"], model_name=request.model,
        body=body, input_items=[m.item() for m in request.messages()],
        history=history + chat_messages(request.messages()) + [assistant_turn(body["output"])],
        expires_at=timezone.now() + timedelta(days=settings.RESPONSES_RETENTION_DAYS),
    )


def delete(organization_id: int, response_id: str) -> dict:
    stored(organization_id, response_id).delete()
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def purge_expired(now=None) -> int:
    """Delete the stored responses past their retention (Celery beat: inference.tasks.purge_expired_responses)."""
    deleted, _ = StoredResponse.objects.filter(expires_at__lte=now or timezone.now()).delete()
    return deleted
