"""The OpenAI-compatible /v1/ API: async views on the request's path, every error in OpenAI form.

Path of a completion request: bearer key and body validation (no I/O) → admission (key, organization and
active entitlements: one query; model 404; replica 503; rate limits: one Redis script call; quota hold:
one statement) → forward → settle and record usage (one statement). The statements are quotas.py's money
path, on the event loop's asyncio pool on PostgreSQL, in a database thread on SQLite.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid

import httpx
import psycopg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from engine import schema
from maas import telemetry
from maas.logging import bind_request_id

from . import metrics, prompt_count, proxy, quotas, responses, routing
from .catalog import CatalogEntry, Upstream, catalog
from .dbthreads import in_worker_thread
from .errors import GatewayError, error_response, invalid_api_key, service_unavailable
from .models import UsageRecord, UsageStatus
from .ratelimit import get_limiter
from .response_stream import ResponseStream
from .validation import InferenceRequest, parse_chat, parse_completion, parse_embedding

logger = logging.getLogger(__name__)

_background: set[asyncio.Task] = set()


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def openai_endpoint(*methods: str):
    """Request id, processing time, method check, and OpenAI error bodies for every failure."""

    def decorate(view):
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            started = time.perf_counter()
            bind_request_id(request, new_request_id())
            request.ratelimit_headers = {}
            error_code = None
            try:
                if request.method not in methods:
                    response = error_response(
                        405, f"Method {request.method} is not allowed on {request.path}. Allowed: {', '.join(methods)}.",
                        headers={"allow": ", ".join(methods)},
                    )
                else:
                    response = await view(request, *args, **kwargs)
            except GatewayError as exc:
                response, error_code = exc.response(), exc.code
            except RequestDataTooBig:
                response = error_response(413, "The request body is too large.")
            except (DatabaseError, psycopg.Error) as exc:  # psycopg: the asyncio path (pgasync)
                logger.error("database unavailable on %s: %s", request.path, exc)
                response = service_unavailable("The service is temporarily unavailable. Please retry.").response()
            except Exception:
                logger.exception("unhandled error on %s", request.path)
                response = error_response(500, "The server had an error while processing your request.", "server_error")
            for name, value in request.ratelimit_headers.items():
                response[name] = value
            response["x-request-id"] = request.request_id
            response["openai-processing-ms"] = str(round((time.perf_counter() - started) * 1000))
            metrics.observe_response(request, response.status_code, error_code)
            telemetry.annotate({"http.response.status_code": response.status_code, "maas.request_id": request.request_id})
            return response

        return wrapper

    return decorate


def bearer_key(request: HttpRequest) -> str:
    header = request.headers.get("authorization", "")
    if not header:
        raise invalid_api_key(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    scheme, _, raw = header.partition(" ")
    raw = raw.strip()
    if scheme.lower() != "bearer" or not raw:
        raise invalid_api_key("Malformed Authorization header: expected 'Bearer sk-...'.")
    return raw


def checked_key(request: HttpRequest) -> str:
    """The bearer key if it is well formed (401 otherwise, without touching the database)."""
    raw = bearer_key(request)
    if quotas.APIKey.parse_public_id(raw) is None:
        raise invalid_api_key(f"Incorrect API key provided: {quotas.redact(raw)}.")
    return raw


async def caller_for(request: HttpRequest) -> quotas.Caller:
    return await quotas.admit_async(checked_key(request))


def model_object(entry: CatalogEntry) -> dict:
    """OpenAI's model object plus documented extras, as the engine names them: the catalog's context length
    (`max_model_len`), what the engine can do with it (`capabilities`), its `tool_format`, and what the
    console's models page shows: `display_name`, `description`, `pricing` and `status` (catalog.py)."""
    model = entry.model
    return {"id": model.name, "object": "model", "created": int(model.created_at.timestamp()), "owned_by": model.owned_by,
            "max_model_len": model.context_length,
            "capabilities": dict(schema.EMBEDDING_CAPABILITIES if model.kind == "embeddings" else schema.CAPABILITIES),
            "tool_format": model.tool_format, "display_name": model.display_name or model.name,
            "description": model.description, "pricing": model.pricing, "status": entry.status}


@openai_endpoint("GET")
async def list_models(request: HttpRequest) -> HttpResponse:
    caller = await caller_for(request)
    data = [model_object(e) for e in caller.visible_models()]
    return HttpResponse(json.dumps({"object": "list", "data": data}), content_type="application/json")


@openai_endpoint("GET")
async def retrieve_model(request: HttpRequest, model_id: str) -> HttpResponse:
    caller = await caller_for(request)
    entry, _ = caller.resolve(model_id)
    return HttpResponse(json.dumps(model_object(entry)), content_type="application/json")


@openai_endpoint("POST")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await complete(request, parse_chat)


@openai_endpoint("POST")
async def completions(request: HttpRequest) -> HttpResponse:
    return await complete(request, parse_completion)


@openai_endpoint("POST")
async def playground_chat_completions(request: HttpRequest) -> HttpResponse:
    """The console's playground: chat completions authenticated by the browser's login session (and its
    CSRF token) instead of a key; from there exactly the path of /v1/chat/completions."""
    return await complete(request, parse_chat, await session_credential(request))


async def session_credential(request: HttpRequest) -> quotas.SessionCredential:
    """The logged-in user and their current organization (set by the console's middleware): 401 without
    a session, 403 without a valid CSRF token (a cookie alone never spends the organization's quota)."""
    user = await request.auser()
    if not user.is_authenticated:
        raise GatewayError(401, "Log in to the console to use the playground.", code="invalid_session")
    if CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is not None:
        raise GatewayError(403, "CSRF verification failed: send the console's CSRF token in the X-CSRFToken header.",
                           "permission_denied", "csrf_failed")
    organization = getattr(request, "organization", None)
    if organization is None:
        raise GatewayError(403, "You are not a member of any organization.", "permission_denied", "no_organization")
    return quotas.SessionCredential(user.pk, organization.pk)


@openai_endpoint("POST")
async def embeddings(request: HttpRequest) -> HttpResponse:
    return await complete(request, parse_embedding)


@openai_endpoint("POST")
async def create_response(request: HttpRequest) -> HttpResponse:
    """POST /v1/responses: one chat completion on the gateway path, answered as a Response (or, streamed, as
    its events: inference/response_stream.py) and stored for the organization unless `store` is false."""
    caller = await caller_for(request)  # 401 before any 400, as OpenAI does
    org_id = caller.organization.pk
    parsed = responses.parse(parse_json_body(request))
    history = await in_worker_thread(responses.history_of)(org_id, parsed.previous_response_id)
    inference = responses.chat_request(parsed, history)
    created_at = int(time.time())
    answer = await complete(request, lambda _body: inference)
    if answer.status_code != 200:
        return answer
    response_id = responses.new_response_id()
    if parsed.stream:
        save = None
        if parsed.store is not False:
            async def save(body):
                await in_worker_thread(responses.store)(org_id, caller.api_key.pk, parsed, body, history)
        events = ResponseStream(parsed, response_id, created_at, save).events(answer.streaming_content)
        streaming = StreamingHttpResponse(events, content_type="text/event-stream")
        streaming["cache-control"], streaming["x-accel-buffering"] = "no-cache", "no"
        return streaming
    body = responses.response_object(parsed, json.loads(answer.content), response_id, created_at)
    if parsed.store is not False:
        await in_worker_thread(responses.store)(org_id, caller.api_key.pk, parsed, body, history)
    return HttpResponse(json.dumps(body), content_type="application/json")


@openai_endpoint("GET", "DELETE")
async def response_detail(request: HttpRequest, response_id: str) -> HttpResponse:
    caller = await caller_for(request)
    if request.method == "DELETE":
        body = await in_worker_thread(responses.delete)(caller.organization.pk, response_id)
    else:
        body = (await in_worker_thread(responses.stored)(caller.organization.pk, response_id)).body
    return HttpResponse(json.dumps(body), content_type="application/json")


@openai_endpoint("GET")
async def response_input_items(request: HttpRequest, response_id: str) -> HttpResponse:
    caller = await caller_for(request)
    found = await in_worker_thread(responses.stored)(caller.organization.pk, response_id)
    items = [{"id": f"msg_{found.response_id.removeprefix('resp_')}_{i}", **item}
             for i, item in enumerate(found.input_items)][::-1]  # newest first, OpenAI's default order
    body = {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": False}
    return HttpResponse(json.dumps(body), content_type="application/json")


@csrf_exempt
async def unknown_path(request: HttpRequest, rest: str = "") -> HttpResponse:
    response = error_response(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    response["x-request-id"] = new_request_id()
    return response


def parse_json_body(request: HttpRequest):
    try:
        return schema.parse_json(request.body)
    except schema.RequestError as exc:
        raise GatewayError(400, exc.message, code=exc.code) from None


def parse_body(request: HttpRequest, parser) -> InferenceRequest:
    return parser(parse_json_body(request))


async def complete(request: HttpRequest, parser, credential: quotas.SessionCredential | None = None) -> HttpResponse:
    """The one gateway path, for a bearer key or (the playground) a session credential."""
    credential = credential or checked_key(request)
    try:
        inference, invalid = parse_body(request, parser), None
    except GatewayError as exc:  # reported after authentication, as OpenAI does
        inference, invalid = None, exc
    request.metric_labels = {}
    admission = await quotas.admit_request_async(
        credential, inference, invalid, request.request_id, get_limiter(), request.metric_labels
    )
    request.ratelimit_headers = admission.decision.headers
    caller, entry = admission.caller, admission.entry
    key_id = caller.api_key.public_id if caller.api_key is not None else caller.source
    telemetry.annotate(
        {
            "maas.organization.id": caller.organization.pk,
            "maas.api_key.id": key_id,
            "maas.usage.source": caller.source,
            "gen_ai.request.model": entry.model.name,
            "maas.deployment.id": admission.upstream.id,
        }
    )
    forward = Forward(request.request_id, inference, admission)
    # The engine's spans join this trace (traceparent) and learn the tenant (baggage).
    with telemetry.tenant_baggage(caller.organization.pk, key_id):
        return await forward.run()


class Forward:
    """One admitted request: forward it, then settle its reservation and write its usage record once."""

    def __init__(self, request_id: str, inference: InferenceRequest, admission: quotas.Admission):
        self.request_id = request_id
        self.inference = inference
        self.entry = admission.entry  # the model that answers: the requested one, or a fallback (send)
        self.first_entry = admission.entry
        self.caller = admission.caller
        self.hold = admission.hold
        self.decision = admission.decision
        self.upstream: Upstream = admission.upstream  # until the router chooses (send)
        self.affinity = routing.affinity_key(inference, self.caller.organization.cache_salt)
        self.replica_held = False  # this request counts in the chosen replica's load (routing.py)
        self.meter = proxy.Meter()
        self.settled = False
        self.reached_engine = False  # an engine accepted it (200): it did work, which is billed
        self.heartbeat: asyncio.TimerHandle | None = None  # keeps the hold from expiring while the answer runs

    def payload(self) -> bytes:
        body = dict(self.inference.body)
        body["model"] = self.upstream.served_model_name
        # Our engine's extensions go only to a server that takes them (an external one may refuse them).
        if self.inference.endpoint != "embeddings" and self.upstream.supports_cache_salt:
            body["cache_salt"] = self.caller.organization.cache_salt  # nothing is cached across embeddings
        if self.inference.endpoint == "chat/completions" and self.upstream.is_engine:
            body["tool_format"] = self.entry.model.tool_format  # the catalog decides how tools are prompted
        if self.inference.default_max_tokens is not None:
            body["max_tokens"] = self.inference.default_max_tokens  # what the hold allows (no max_tokens given)
        if self.inference.stream:
            options = {**(body.get("stream_options") or {}), "include_usage": True}
            if self.upstream.is_engine:  # the usage so far on every chunk: a cut stream is billed exactly
                options["continuous_usage_stats"] = True
            body["stream_options"] = options
        return json.dumps(body).encode()

    async def run(self) -> HttpResponse:
        try:
            response = await self.send()
        except asyncio.CancelledError:  # the client left while the engine had the request: its prompt is billed
            self.meter.status, self.meter.http_status = UsageStatus.CLIENT_DISCONNECTED, 499
            self.reached_engine = True
            await self.finish_shielded()
            raise
        except BaseException:
            await self.finish()
            raise
        self.reached_engine = response.status_code == 200
        self.keep_hold()
        if not self.inference.stream:
            try:
                return await self.read_whole(response)
            finally:
                await self.finish_shielded()
        if response.status_code != 200:
            try:
                error = proxy.upstream_error_response(response.status_code, await response.aread())
                self.meter.status = UsageStatus.REJECTED_UPSTREAM if error.status < 500 else UsageStatus.UPSTREAM_ERROR
                self.meter.http_status = error.status
            finally:
                await response.aclose()
                await self.release_replica()
                await self.finish()
            raise error
        streaming = StreamingHttpResponse(self.stream(response), content_type="text/event-stream")
        streaming["cache-control"] = "no-cache"
        streaming["x-accel-buffering"] = "no"
        return streaming

    async def send(self) -> httpx.Response:
        """The first answer with response headers from a replica of the model, else of its fallbacks.

        An attempt fails over before any byte of an answer: connect error, timeout before the headers
        (GATEWAY_FIRST_BYTE_TIMEOUT), a 5xx or a 429 from the upstream. A 4xx is the request's own and is
        relayed; once headers arrived nothing is retried (the caller relays the body). Each attempt is a
        span; the usage record names the deployment and model that answered (`self.upstream`, `self.entry`).
        """
        router = routing.get_router()
        last_failure: tuple[int, bytes] | tuple[str, GatewayError] | None = None
        for attempt_entry in routing.candidate_entries(self.caller, self.first_entry, self.inference.endpoint):
            tried: set[int] = set()
            while (upstream := await router.choose(attempt_entry, self.affinity, self.request_id,
                                                   frozenset(tried))) is not None:
                tried.add(upstream.id)
                self.entry, self.upstream, self.replica_held = attempt_entry, upstream, True
                catalog.started(upstream)
                with telemetry.span("gateway.upstream_request", {
                    "maas.deployment.id": upstream.id, "gen_ai.request.model": attempt_entry.model.name,
                    "maas.attempt": len(tried), "maas.fallback": attempt_entry is not self.first_entry,
                }):
                    try:
                        response = await self.attempt()
                    except httpx.HTTPError as exc:
                        await self.release_replica()
                        status, error = proxy.upstream_failure(exc)
                        telemetry.annotate({"error.type": type(exc).__name__})
                        logger.warning("upstream %s failed before answering %s: %s", upstream.base_url,
                                       self.request_id, exc)
                        if status == UsageStatus.UPSTREAM_UNAVAILABLE:
                            catalog.bench(upstream)
                        last_failure = (status, error)
                        continue
                    telemetry.annotate({"http.response.status_code": response.status_code})
                    if response.status_code < 500 and response.status_code != 429:
                        telemetry.annotate({"maas.deployment.id": upstream.id,
                                            "gen_ai.response.model": attempt_entry.model.name})
                        return response
                    last_failure = (response.status_code, await response.aread())
                    await response.aclose()
                    await self.release_replica()
        if last_failure is not None and isinstance(last_failure[0], int):  # the last attempt's 5xx or 429
            error = proxy.upstream_error_response(*last_failure)
            self.meter.status = UsageStatus.REJECTED_UPSTREAM if error.status < 500 else UsageStatus.UPSTREAM_ERROR
            self.meter.http_status = error.status
            raise error
        if last_failure is not None:  # the last attempt's transport failure
            self.meter.status, error = last_failure
            self.meter.http_status = error.status
            raise error
        self.meter.status, self.meter.http_status = UsageStatus.UPSTREAM_UNAVAILABLE, 503
        raise service_unavailable(f"The model `{self.entry.model.name}` is temporarily unavailable: no healthy "
                                  "replica. Please retry.")

    async def attempt(self) -> httpx.Response:
        """One POST to `self.upstream`; no response headers within GATEWAY_FIRST_BYTE_TIMEOUT is a timeout."""
        sending = proxy.send(self.upstream, self.inference.endpoint, self.payload(), self.request_id)
        if not settings.GATEWAY_FIRST_BYTE_TIMEOUT:
            return await sending
        try:
            return await asyncio.wait_for(sending, settings.GATEWAY_FIRST_BYTE_TIMEOUT)
        except TimeoutError:
            raise httpx.ReadTimeout("no response headers within GATEWAY_FIRST_BYTE_TIMEOUT") from None

    async def release_replica(self) -> None:
        """This request no longer counts in its replica's load (once)."""
        if self.replica_held:
            self.replica_held = False
            catalog.finished(self.upstream)
            await routing.get_router().release(self.upstream, self.request_id)

    async def read_whole(self, response: httpx.Response) -> HttpResponse:
        try:
            try:
                content = await response.aread()
            except asyncio.CancelledError:  # the client left: the engine aborts; what it did is billed
                self.meter.status, self.meter.http_status = UsageStatus.CLIENT_DISCONNECTED, 499
                raise
            except httpx.HTTPError as exc:  # after the response began: the engine's failure, never retried
                self.meter.status, error = proxy.upstream_failure(exc)
                self.meter.http_status = error.status
                raise error from exc
            finally:
                await response.aclose()
            if response.status_code != 200:
                error = proxy.upstream_error_response(response.status_code, content)
                self.meter.status = UsageStatus.REJECTED_UPSTREAM if error.status < 500 else UsageStatus.UPSTREAM_ERROR
                self.meter.http_status = error.status
                raise error
            try:
                body = json.loads(content)
                if "error" in body:
                    # A long answer's 200 was already sent (keep-alive whitespace) when the engine failed.
                    error = proxy.upstream_error_response(502, content)
                    self.meter.status, self.meter.http_status = UsageStatus.UPSTREAM_ERROR, error.status
                    raise error
                self.meter.take_usage(body.get("usage"))
                if not self.meter.usage_reported:  # a server that reports no usage: counted in finish()
                    proxy.take_answer_text(body, self.meter)
            except (ValueError, AttributeError, TypeError):
                self.meter.status, self.meter.http_status = UsageStatus.UPSTREAM_ERROR, 502
                raise GatewayError(502, "The model server sent an invalid response.", "server_error", "upstream_error") from None
            self.meter.mark_first_token()
            return HttpResponse(content, content_type="application/json")
        finally:
            await self.release_replica()

    async def stream(self, response: httpx.Response):
        try:
            async for part in proxy.relay_stream(response, self.meter, self.inference.include_usage, self.upstream,
                                                  client_wants_progress=self.inference.request.continuous_usage):
                yield part
        finally:
            await self.release_replica()
            await self.finish_shielded()
        if self.meter.done:
            yield b"data: [DONE]\n\n"  # only once the usage is recorded

    async def finish_shielded(self) -> None:
        """`finish`, shielded: a client that disconnects cancels the response, never the settlement."""
        task = asyncio.ensure_future(self.finish())
        _background.add(task)
        task.add_done_callback(_background.discard)
        await asyncio.shield(task)

    def keep_hold(self) -> None:
        """Every third of the reservation TTL until settlement, extend the hold and the concurrency slot:
        a long answer keeps both. A timer, not a task: most requests settle long before it fires."""
        period = settings.GATEWAY_RESERVATION_TTL_SECONDS / 3
        self.heartbeat = asyncio.get_running_loop().call_later(period, self._extend_in_background)

    def _extend_in_background(self) -> None:
        task = asyncio.ensure_future(self._extend())
        _background.add(task)
        task.add_done_callback(_background.discard)
        if not self.settled:
            self.keep_hold()

    async def _extend(self) -> None:
        try:
            await quotas.extend_hold_async(self.hold)
            await get_limiter().extend_async(self.decision)
            await routing.get_router().extend(self.upstream, self.request_id)
        except Exception:  # noqa: BLE001 - tried again next period; the sweep is minutes away
            logger.warning("could not extend the hold of %s", self.request_id, exc_info=True)

    async def finish(self) -> None:
        """Settle the hold and write the one usage record (idempotent)."""
        if self.settled:
            return
        self.settled = True
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        await self.release_replica()
        meter = self.meter
        try:
            if not meter.usage_reported and self.reached_engine:
                await self.count_unreported()
            prompt = meter.prompt_tokens or 0
            model = self.entry.model
            key, organization = self.caller.api_key, self.caller.organization
            record = UsageRecord(
                organization_id=organization.pk,
                api_key_id=key.pk if key is not None else None,
                user_id=self.caller.user_id,
                source=self.caller.source,
                entitlement_id=self.hold.entitlement_id,
                model_id=model.pk,
                model_name=model.name,
                deployment_id=self.upstream.id,
                endpoint=self.inference.usage_endpoint or self.inference.endpoint,
                prompt_tokens=prompt,
                cached_tokens=min(meter.cached_tokens, prompt),
                completion_tokens=meter.completion_tokens,
                cost=model.cost(prompt, min(meter.cached_tokens, prompt), meter.completion_tokens),
                status=meter.status,
                http_status=meter.http_status,
                stream=self.inference.stream,
                time_to_first_token_ms=meter.ttft_ms,
                latency_ms=meter.latency_ms,
                request_id=self.request_id,
            )
            with telemetry.span(
                "gateway.settlement",
                {
                    "gen_ai.usage.input_tokens": prompt,
                    "gen_ai.usage.output_tokens": meter.completion_tokens,
                    "maas.usage.cached_tokens": record.cached_tokens,
                    "maas.usage.status": meter.status,
                },
            ):
                try:
                    await quotas.settle_async(self.hold, prompt + meter.completion_tokens, record, key)
                finally:
                    await get_limiter().release_async(self.decision, prompt + meter.completion_tokens)
            metrics.observe_usage(model.name, organization.slug, self.upstream.id, meter)
        except Exception:
            logger.exception("could not settle %s; its reservation expires on its own", self.request_id)


    async def count_unreported(self) -> None:
        """Work the upstream did without reporting its usage (client gone, stream cut, engine dead, a server
        that reports none): counted with the model's tokenizer here when the gateway has it (the replica's,
        or a sibling engine's: prompt_count.model_builder), else by a replica's /tokenize."""
        builder = prompt_count.model_builder(self.entry.upstreams, self.upstream)
        if builder is False:
            source = prompt_count.tokenizer_sources(self.entry.upstreams, self.upstream)[0]
            builder = await sync_to_async(prompt_count.fetch, thread_sensitive=False)(source)
        tool_format = self.entry.model.tool_format if self.inference.endpoint == "chat/completions" else None
        if builder is not None:
            prompt_count.count_cut(builder, self.inference, tool_format, self.meter)
            return
        counter = next((u for u in (self.upstream, *self.entry.upstreams) if u.supports_tokenize), None)
        if counter is not None and (self.meter.completion_tokens or not self.upstream.supports_tokenize):
            await proxy.count_cut_stream(counter, self.inference.body, self.meter, self.request_id)

