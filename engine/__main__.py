"""`python -m engine serve --model PATH [...]`: load the model, then serve the OpenAI API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import torch

from engine.config import EngineConfig, parse_bytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    serve.add_argument("--model", required=True, help="a Hugging Face model directory or a .gguf file; an encoder "
                       "(BERT-family) directory is served for /v1/embeddings")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8100)
    serve.add_argument("--served-model-name", help="the model id clients send (default: the file/directory stem)")
    serve.add_argument("--api-key", default=os.environ.get("ENGINE_API_KEY") or None,
                       help="require 'Authorization: Bearer TOKEN' on /v1 and /tokenize (default: $ENGINE_API_KEY, "
                            "which keeps the token out of the process list)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    serve.add_argument("--kv-cache-memory", type=parse_bytes,
                       help="bytes for the KV-cache pool, e.g. 2GiB (default: --gpu-memory-fraction of free GPU "
                            "memory on CUDA, 1GiB on CPU)")
    serve.add_argument("--gpu-memory-fraction", type=float, default=0.9,
                       help="share of the GPU's memory the engine may use: weights, the activation peak a warm-up "
                            "step measures, and the KV cache, which gets the rest")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="never replay CUDA graphs (default on CUDA: decode steps replay graphs captured per "
                            "batch-size bucket; always eager on CPU)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    serve.add_argument("--max-num-batched-tokens", type=int, default=1024,
                       help="per-step token budget; longer prompts are prefilled in chunks")
    serve.add_argument("--max-model-len", type=int, help="context length cap (default: the model's)")
    serve.add_argument("--max-waiting-requests", type=int, default=1024, help="beyond this, answer 503")
    serve.add_argument("--max-tokens-per-request", type=int, default=32768,
                       help="most tokens one request may generate over all its choices (n x max_tokens); "
                            "without max_tokens a choice gets up to the context length and at most this / n")
    serve.add_argument("--timeout-keep-alive", type=float, default=75.0,
                       help="seconds an idle HTTP connection stays open; keep it above the gateway pool's "
                            "GATEWAY_UPSTREAM_KEEPALIVE_EXPIRY (30 s) so it never closes one the gateway reuses")
    serve.add_argument("--keepalive-interval", type=float, default=15.0,
                       help="a non-streamed answer still generating after this many seconds gets its 200 and then "
                            "a space every this many seconds until the JSON, so proxies never time out on silence")
    serve.add_argument("--fatal-exit-delay", type=float, default=2.0,
                       help="seconds between an engine failure (reported by /health) and the process exiting "
                            "with status 1, for its supervisor to restart it")
    serve.add_argument("--tool-format", choices=("auto", "hermes"), default="auto",
                       help="how tools reach the prompt: auto (the chat template if it supports tools, else the "
                            "Hermes-style default) or hermes; a request's tool_format (the gateway's catalog) wins")
    serve.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="split the model across this many ranks on this host (cuda:0..N-1, or CPU processes "
                            "over gloo): heads, MLP and vocabulary are sharded; dense and GGUF weights only")
    serve.add_argument("--quantization", choices=("auto", "dense"), default="auto",
                       help="auto: a quantized checkpoint's weights stay packed where our kernels take them "
                            "(GGUF on CUDA or in bfloat16, AWQ, GPTQ, FP8); dense: GGUF weights dequantized to "
                            "--dtype at load (more memory, dense matmuls)")
    serve.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    serve.add_argument("--dtype", choices=sorted(_DTYPES),
                       help="default: bfloat16 on CUDA; on CPU bfloat16 for a quantized GGUF (the fast mode: "
                            "4-bit weights kept packed for ATen's int4 GEMM), else float32; float32 "
                            "is the exact mode (transformers' logits, greedy answers independent of batch "
                            "neighbours and prefix-cache hits)")
    serve.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    serve.add_argument("--threads", type=int, help="torch CPU threads")
    serve.add_argument("--log-level", default="info")
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from engine import telemetry
    from engine.async_engine import AsyncEngine
    from engine.embedding_engine import EmbeddingEngine
    from engine.failures import install_test_fault
    from engine.llm_engine import LLMEngine
    from engine.loader.encoder import is_encoder_directory
    from engine.server import build_app

    log_config = telemetry.configure_logging(args.log_level)  # LOG_FORMAT=json: JSON lines with trace ids
    encoder = is_encoder_directory(args.model)
    config = EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=_DTYPES.get(args.dtype),
        device=args.device, block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_fraction=args.gpu_memory_fraction, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_waiting_requests=args.max_waiting_requests, enable_prefix_caching=not args.no_prefix_caching,
        torch_threads=args.threads, max_tokens_per_request=args.max_tokens_per_request,
        enforce_eager=True if args.enforce_eager else None, tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
    )
    telemetry.configure_tracing()  # from OTEL_* variables; nothing without them
    if encoder and args.tensor_parallel_size > 1:
        raise SystemExit("--tensor-parallel-size: embedding models run on one device")

    def make_engine() -> LLMEngine | EmbeddingEngine:
        llm_engine = EmbeddingEngine(config) if encoder else LLMEngine(config)
        install_test_fault(llm_engine, os.environ.get("ENGINE_TEST_FAULT"))
        return llm_engine

    engine = AsyncEngine.on_own_thread(make_engine, on_fatal=lambda exc: exit_soon(args.fatal_exit_delay))
    app = build_app(engine, api_key=args.api_key, keepalive_interval=args.keepalive_interval,
                    tool_format=args.tool_format)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                timeout_keep_alive=args.timeout_keep_alive,
                **({"log_config": log_config} if log_config else {}))


def exit_soon(delay: float) -> None:
    """The engine is broken: let /health report it for `delay` seconds, then exit non-zero (no cleanup that
    could hang on a broken device), so that the supervisor (compose, systemd, Kubernetes) restarts us."""

    def leave() -> None:
        logging.getLogger("engine").critical("engine failure: exiting with status 1 for a restart")
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)

    threading.Timer(delay, leave).start()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
