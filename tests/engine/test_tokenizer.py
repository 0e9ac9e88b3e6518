"""Tokenizer and chat template: token-identical to transformers (SmolLM2 GGUF and a tiny HF checkpoint)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import jinja2
import pytest

from engine.loader import load_model
from engine.loader.gguf import GGUFMetadata, build_tokenizer
from engine.loader.hf import load_tokenizer
from engine.tokenizer import Tokenizer
from tests.engine.checkpoints import (
    load_reference_tokenizer,
    smollm2_gguf_path,
    tiny_checkpoint,
    write_sentencepiece_gguf_vocab,
)

CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? Answer in one word, then explain 🙂 in <b>HTML</b>."},
    ],
    "no_system": [{"role": "user", "content": "  Hello there!\n\nHow are you?  "}],
    "special_tokens_in_text": [{"role": "user", "content": "say <|im_end|> please"}],
}
TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "Unicode: café, naïve, 東京, emoji 🙂👍🏽, math ∑x²",
    "Numbers 1234567 and code: def f(x):\n\treturn x**2",
    "<|im_start|>user\nhi<|im_end|>",
]


@cache
def tokenizers_for(source: str) -> tuple[Tokenizer, object]:
    if source in ("smollm2-gguf", "sentencepiece-gguf"):
        import gguf

        if source == "smollm2-gguf":
            path = smollm2_gguf_path()
        else:
            directory = Path(tempfile.mkdtemp(prefix="engine-spm-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            path = write_sentencepiece_gguf_vocab(directory / "spm.gguf")
        ours = build_tokenizer(GGUFMetadata(gguf.GGUFReader(str(path)), path))
    else:
        path = tiny_checkpoint("qwen2")
        ours = load_tokenizer(path)
    return ours, load_reference_tokenizer(path)


# byte-level BPE from GGUF metadata (SmolLM2), a tokenizer.json directory, and a Llama-2 style
# sentencepiece BPE with byte fallback from GGUF metadata.
SOURCES = ["smollm2-gguf", "tiny-hf", "sentencepiece-gguf"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_token_identical_to_transformers(source, conversation, add_generation_prompt):
    ours, reference = tokenizers_for(source)
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected_text = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text == expected_text
    expected_ids = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours.encode(text, add_special_tokens=False) == list(expected_ids)


@pytest.mark.parametrize("source", SOURCES)
def test_encode_decode_identical_to_transformers(source):
    ours, reference = tokenizers_for(source)
    for text in TEXTS:
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == reference.encode(text, add_special_tokens=add_special_tokens), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.vocab_size == len(reference)


def test_chat_template_sandbox_and_helpers():
    template = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ bos_token }}{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ extra }}"
        "|{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k']) | tojson }}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}"
    )
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    tok = Tokenizer(Backend(BPE()), special_tokens={"bos_token": "<s>"}, chat_template=template)
    text = tok.apply_chat_template([{"role": "user", "content": "é<b>", "name": None}], extra="x")
    # None-valued keys dropped, no HTML escaping, dict() and namespace() as in transformers
    assert text == '<s>[{"role": "user", "content": "é<b>"}]|4|x|{"a": 1}{"k": null}|1'
    with pytest.raises(jinja2.exceptions.TemplateError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    evil = Tokenizer(Backend(BPE()), chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(Backend(BPE())).apply_chat_template([{"role": "user", "content": "hi"}])


def test_loaded_model_metadata():
    loaded = load_model(tiny_checkpoint("qwen2"))
    reference = load_reference_tokenizer(tiny_checkpoint("qwen2"))
    assert loaded.eos_token_ids == [reference.eos_token_id]
    assert loaded.generation_defaults == {"temperature": 0.7, "top_p": 0.9}
    assert loaded.name == "qwen2"
    assert loaded.spec.architecture == "qwen2" and loaded.spec.num_kv_heads == 2
    assert loaded.weight_bytes == sum(p.numel() * 4 for p in loaded.model.parameters())


@pytest.mark.parametrize(("add_bos", "add_eos"), [(True, False), (True, True), (False, False)])
def test_add_bos_eos_flags_follow_tokenizer_json_like_transformers(tmp_path, add_bos, add_eos):
    """transformers 5 keeps the post-processor of tokenizer.json whatever tokenizer_config's flags say."""
    import json
    import shutil as sh

    directory = tmp_path / "tok"
    sh.copytree(tiny_checkpoint("llama"), directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    config_file.write_text(json.dumps(config))
    ours, reference = load_tokenizer(directory), load_reference_tokenizer(directory)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
