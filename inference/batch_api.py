"""/v1/files and /v1/batches: the views translate (parse the request, call one service or selector on
the gateway's database threads, answer JSON); inference/files.py and inference/batches.py decide."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse

from . import batches, files
from .errors import GatewayError
from .views import caller_for, in_worker_thread, openai_endpoint, parse_json_body


def json_response(body: dict) -> HttpResponse:
    return HttpResponse(json.dumps(body), content_type="application/json")


def list_params(request: HttpRequest, default_limit: int, max_limit: int) -> tuple[int, str | None]:
    raw = request.GET.get("limit")
    try:
        limit = default_limit if raw is None else int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= max_limit:
        raise GatewayError(400, f"'limit' must be an integer from 1 to {max_limit}.", code="invalid_value", param="limit")
    return limit, request.GET.get("after") or None


@openai_endpoint("GET", "POST")
async def files_collection(request: HttpRequest) -> HttpResponse:
    caller = await caller_for(request)
    org, key_id = caller.organization, caller.api_key.pk
    if request.method == "POST":
        def upload():
            unknown = sorted(set(request.POST) - {"purpose"} | set(request.FILES) - {"file"})
            if unknown:
                raise GatewayError(400, f"Unrecognized request argument supplied: {unknown[0]}",
                                   code="unknown_parameter", param=unknown[0])
            return files.file_object(files.upload(org, key_id, request.FILES.get("file"), request.POST.get("purpose")))
        return json_response(await in_worker_thread(upload)())
    limit, after = list_params(request, 10000, 10000)
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError(400, "'order' must be 'asc' or 'desc'.", code="invalid_value", param="order")
    purpose = request.GET.get("purpose") or None
    return json_response(await in_worker_thread(files.listing)(org, purpose, limit, order, after))


@openai_endpoint("GET", "DELETE")
async def file_detail(request: HttpRequest, file_id: str) -> HttpResponse:
    caller = await caller_for(request)
    if request.method == "DELETE":
        return json_response(await in_worker_thread(files.delete)(caller.organization, file_id))
    return json_response(files.file_object(await in_worker_thread(files.get)(caller.organization, file_id)))


@openai_endpoint("GET")
async def file_content(request: HttpRequest, file_id: str) -> HttpResponse:
    caller = await caller_for(request)

    def content():
        stored = files.get(caller.organization, file_id)
        return stored, files.read(stored)

    stored, data = await in_worker_thread(content)()
    response = HttpResponse(data, content_type="application/jsonl" if stored.filename.endswith(".jsonl")
                            else "application/octet-stream")
    response["content-disposition"] = f'attachment; filename="{stored.filename}"'
    return response


@openai_endpoint("GET", "POST")
async def batches_collection(request: HttpRequest) -> HttpResponse:
    caller = await caller_for(request)
    if request.method == "POST":
        body = parse_json_body(request)
        batch = await in_worker_thread(batches.create)(caller.organization, caller.api_key.pk, body)
        return json_response(batches.batch_object(batch))
    limit, after = list_params(request, 20, 100)
    return json_response(await in_worker_thread(batches.listing)(caller.organization, limit, after))


@openai_endpoint("GET")
async def batch_detail(request: HttpRequest, batch_id: str) -> HttpResponse:
    caller = await caller_for(request)
    batch = await in_worker_thread(batches.get)(caller.organization, batch_id)
    return json_response(batches.batch_object(batch))


@openai_endpoint("POST")
async def batch_cancel(request: HttpRequest, batch_id: str) -> HttpResponse:
    caller = await caller_for(request)
    batch = await in_worker_thread(batches.cancel)(caller.organization, batch_id)
    return json_response(batches.batch_object(batch))
