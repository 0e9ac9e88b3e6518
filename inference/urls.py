from django.urls import path, re_path

from . import batch_api, console, views

urlpatterns = [
    path("v1/models", views.list_models, name="v1-models"),
    path("v1/models/<path:model_id>", views.retrieve_model, name="v1-model"),
    path("v1/chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("v1/completions", views.completions, name="v1-completions"),
    path("v1/embeddings", views.embeddings, name="v1-embeddings"),
    path("v1/responses", views.create_response, name="v1-responses"),
    path("v1/responses/<str:response_id>", views.response_detail, name="v1-response"),
    path("v1/responses/<str:response_id>/input_items", views.response_input_items, name="v1-response-input-items"),
    path("v1/files", batch_api.files_collection, name="v1-files"),
    path("v1/files/<str:file_id>", batch_api.file_detail, name="v1-file"),
    path("v1/files/<str:file_id>/content", batch_api.file_content, name="v1-file-content"),
    path("v1/batches", batch_api.batches_collection, name="v1-batches"),
    path("v1/batches/<str:batch_id>", batch_api.batch_detail, name="v1-batch"),
    path("v1/batches/<str:batch_id>/cancel", batch_api.batch_cancel, name="v1-batch-cancel"),
    re_path(r"^v1(?:/(?P<rest>.*))?$", views.unknown_path),
    path("playground/v1/chat/completions", views.playground_chat_completions, name="playground-chat-completions"),
    path("api/usage", console.UsageAPI.as_view(), name="api-usage"),
    path("usage/", console.usage_page, name="usage"),
    path("usage/export.csv", console.usage_csv, name="usage-csv"),
    path("budgets/", console.budgets_page, name="budgets"),
    path("budgets/keys/<int:key_id>/", console.key_budget, name="key-budget"),
    path("requests/", console.request_log_page, name="request-log"),
    path("batches/", console.batches_page, name="batches"),
    path("batches/files/<str:file_id>/download", console.batch_file_download, name="batch-file-download"),
    path("operator/", console.operator_overview, name="operator-overview"),
    path("models/", console.models_page, name="models"),
    path("playground/", console.playground_page, name="playground"),
    path("get-started/", console.quickstart_page, name="quickstart"),
]
