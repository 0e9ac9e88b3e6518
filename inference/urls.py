from django.urls import path, re_path

from . import console, views

urlpatterns = [
    path("v1/models", views.list_models, name="v1-models"),
    path("v1/models/<path:model_id>", views.retrieve_model, name="v1-model"),
    path("v1/chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("v1/completions", views.completions, name="v1-completions"),
    path("v1/embeddings", views.embeddings, name="v1-embeddings"),
    path("v1/responses", views.create_response, name="v1-responses"),
    path("v1/responses/<str:response_id>", views.response_detail, name="v1-response"),
    path("v1/responses/<str:response_id>/input_items", views.response_input_items, name="v1-response-input-items"),
    re_path(r"^v1(?:/(?P<rest>.*))?$", views.unknown_path),
    path("playground/v1/chat/completions", views.playground_chat_completions, name="playground-chat-completions"),
    path("api/usage", console.UsageAPI.as_view(), name="api-usage"),
    path("usage/", console.usage_page, name="usage"),
    path("usage/export.csv", console.usage_csv, name="usage-csv"),
    path("requests/", console.request_log_page, name="request-log"),
    path("operator/", console.operator_overview, name="operator-overview"),
    path("models/", console.models_page, name="models"),
    path("playground/", console.playground_page, name="playground"),
    path("get-started/", console.quickstart_page, name="quickstart"),
]
