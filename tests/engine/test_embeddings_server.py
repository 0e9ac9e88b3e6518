"""`python -m engine serve` on an encoder directory: /v1/embeddings through the official openai client,
bodies on OpenAI's spec, and the 400s of what an embeddings model cannot do."""

from __future__ import annotations

import base64
import struct
import threading

import httpx
import openai
import pytest
import torch
from torch.nn import functional as F

from engine.loader.encoder import demo_embedding_model_path
from tests.openapi_spec import validate_error, validate_response
from tests.processes import start_engine, stop

MODEL = "all-minilm-l6-v2"
pytestmark = pytest.mark.slow
SENTENCES = ["The weather is lovely today.", "It is sunny and warm outside.", "He drove his truck to the garage."]


@pytest.fixture(scope="module")
def server():
    process, url = start_engine(demo_embedding_model_path(), "--served-model-name", MODEL, "--threads", "2",
                                "--log-level", "warning", "--max-num-batched-tokens", "4096")
    yield url
    stop(process, timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return torch.from_numpy(SentenceTransformer(str(demo_embedding_model_path()), device="cpu").encode(SENTENCES))


def post(server: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/embeddings", json=body, timeout=60)


def decoded(body: dict) -> dict:
    """A base64 body with its vectors decoded to floats (the spec describes the float form only)."""
    data = [{**d, "embedding": list(struct.unpack(f"<{len(base64.b64decode(d['embedding'])) // 4}f",
                                                  base64.b64decode(d["embedding"])))} for d in body["data"]]
    return {**body, "data": data}


def test_the_model_lists_itself_as_an_embeddings_model(server, client):
    model = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert model["id"] == MODEL and model["capabilities"] == {"embeddings": True} and model["max_model_len"] == 256


def test_sdk_embeddings_of_a_list_of_strings_match_sentence_transformers(client, server, reference):
    response = client.embeddings.create(model=MODEL, input=SENTENCES, encoding_format="float")
    vectors = torch.tensor([d.embedding for d in response.data])
    assert [d.index for d in response.data] == [0, 1, 2] and response.model == MODEL
    assert F.cosine_similarity(vectors, reference).min().item() >= 0.999
    tokens = sum(len(httpx.post(f"{server}/tokenize", json={"prompt": s}).json()["tokens"]) for s in SENTENCES)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    validate_response("/v1/embeddings", "post", 200, response.model_dump())


def test_sdk_default_base64_is_decoded_and_equals_the_float_answer(client, reference):
    # the SDK asks for base64 unless told otherwise and decodes it to floats
    response = client.embeddings.create(model=MODEL, input=SENTENCES[0])
    assert len(response.data) == 1 and len(response.data[0].embedding) == 384
    vector = torch.tensor(response.data[0].embedding)
    assert F.cosine_similarity(vector, reference[0], dim=0).item() >= 0.999


def test_token_inputs_embed_as_their_text_does(client, server):
    tokens = [httpx.post(f"{server}/tokenize", json={"prompt": s}).json()["tokens"] for s in SENTENCES[:2]]
    as_text = client.embeddings.create(model=MODEL, input=SENTENCES[:2], encoding_format="float")
    as_lists = client.embeddings.create(model=MODEL, input=tokens, encoding_format="float")
    one = client.embeddings.create(model=MODEL, input=tokens[0], encoding_format="float")
    for a, b in zip(as_text.data, as_lists.data, strict=True):
        assert torch.allclose(torch.tensor(a.embedding), torch.tensor(b.embedding), atol=1e-5)
    assert torch.allclose(torch.tensor(one.data[0].embedding), torch.tensor(as_text.data[0].embedding), atol=1e-5)
    assert as_lists.usage.prompt_tokens == len(tokens[0]) + len(tokens[1])


def test_dimensions_shorten_the_vector_and_keep_it_normalized(client, server):
    full = client.embeddings.create(model=MODEL, input=SENTENCES[0], encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=MODEL, input=SENTENCES[0], dimensions=64).data[0].embedding
    assert len(short) == 64
    assert torch.allclose(torch.tensor(short), F.normalize(torch.tensor(full[:64]), dim=0), atol=1e-5)
    raw = post(server, {"model": MODEL, "input": SENTENCES, "encoding_format": "base64", "dimensions": 8})
    assert raw.status_code == 200 and all(len(base64.b64decode(d["embedding"])) == 32 for d in raw.json()["data"])
    validate_response("/v1/embeddings", "post", 200, decoded(raw.json()))


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"input": "x" * 0}, 400, "input", "invalid_value"),
    ({"input": []}, 400, "input", "invalid_type"),
    ({"input": ["ok", ""]}, 400, "input[1]", "invalid_value"),
    ({"input": [[101, 102], []]}, 400, "input[1]", "invalid_value"),
    ({"input": ["a", 1]}, 400, "input", "invalid_type"),
    ({"input": ["a"] * 2049}, 400, "input", "invalid_value"),
    ({"input": [101, 30522]}, 400, "input", None),
    ({"input": ["short", " ".join(["word"] * 300)]}, 400, "input[1]", "context_length_exceeded"),
    ({"input": "x", "dimensions": 385}, 400, "dimensions", None),
    ({"input": "x", "dimensions": 0}, 400, "dimensions", "invalid_value"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "invalid_value"),
    ({"input": "x", "truncate": True}, 400, "truncate", "unknown_parameter"),
    ({"input": "x", "model": "other"}, 404, "model", "model_not_found"),
])
def test_bad_embedding_requests_are_openai_errors_naming_the_field(server, body, status, param, code):
    response = post(server, {"model": MODEL, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    validate_error(response.json())


def test_chat_and_completions_on_an_embeddings_model_are_400s(server):
    for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("completions", {"prompt": "hi"})):
        response = httpx.post(f"{server}/v1/{path}", json={"model": MODEL, **body}, timeout=30)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "model_not_supported" and "/v1/embeddings" in error["message"]


def counter(server: str, name: str) -> float:
    line = next(line for line in httpx.get(f"{server}/metrics").text.splitlines() if line.startswith(name))
    return float(line.split()[-1])


def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors(server, client):
    results: dict[int, list] = {}
    passes_before = counter(server, "engine_embedding_batch_size_count")

    def call(i: int) -> None:
        texts = [f"{SENTENCES[i % 3]} ({i})"] * (1 + i % 3)
        results[i] = [d.embedding for d in client.embeddings.create(model=MODEL, input=texts,
                                                                    encoding_format="float").data]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    passes = counter(server, "engine_embedding_batch_size_count") - passes_before
    assert len(results) == len(threads)
    assert passes < len(threads)  # fewer encoder passes than requests: concurrent requests shared steps
    for i, vectors in results.items():
        alone = client.embeddings.create(model=MODEL, input=f"{SENTENCES[i % 3]} ({i})",
                                         encoding_format="float").data[0].embedding
        assert len(vectors) == 1 + i % 3
        assert all(torch.allclose(torch.tensor(v), torch.tensor(alone), atol=1e-5) for v in vectors)
