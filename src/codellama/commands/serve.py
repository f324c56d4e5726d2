"""`codellama serve`: an OpenAI-compatible server (completions with `suffix` infilling, chat, streaming)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
from pathlib import Path

from codellama.commands.generate import add_kv_cache_arg, add_lookup_arg, add_precision_args, check_lookup, kv_dtype
from codellama.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions with `suffix` for "
        "infilling, /v1/chat/completions, /v1/models, /health) with continuous batching.",
    )
    p.add_argument("--model", "-m", default=None,
                   help="HF dir, Meta dir, .gguf file or preset name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", default=None, help="the name clients send as `model` (default: from --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("CODELLAMA_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $CODELLAMA_API_KEY; unset = no auth)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from this origin (e.g. http://localhost:3000; '*': any) call the API from a "
                   "browser; repeatable (default: none, as browsers then refuse cross-origin calls)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_precision_args(p)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence, prompt + completion (default: the model's context, at most 4096; "
                   "past the model's, with a warning; the KV cache holds max-batch x context positions)")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="generations running or queued before new requests get 429")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile prefill and the decode step, the latter with CUDA graphs (default: on CUDA)")
    p.add_argument("--log-file", type=Path, default=None, help="also append the JSON request log here")
    p.add_argument("--reuse-prefixes", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill a prompt only from where it differs from what a free cache slot holds (an editor "
                   "resending a file, a chat its history; usage.prompt_tokens_details.cached_tokens counts them); "
                   "--no-reuse-prefixes prefills every prompt whole (logits then never depend on earlier "
                   "requests, not even by float rounding)")
    add_lookup_arg(p)
    add_kv_cache_arg(p)
    p.add_argument("--spm", action="store_true",
                   help="lay out `suffix` requests suffix-first (<PRE> <SUF> suffix <MID> prefix; default: "
                   "prefix-suffix-middle): an editor typing at the cursor then changes only the prompt's end, so "
                   "the rest of the file is reused, not prefilled again; Code Llama was trained on both orders, "
                   "SPM being weaker when the cursor splits a word (docs/serving.md)")
    p.set_defaults(func=run)


def model_name(spec: str | None) -> str:
    """The name clients send as `model`: the file or folder name of --model (a .gguf without its suffix)."""
    if spec in (None, "default"):
        return "smollm2-135m-instruct"
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.name


def run(args: argparse.Namespace) -> int:
    import torch

    from codellama.engine.batching import Engine
    from codellama.generate import load_for_inference, warn_past_trained_context
    from codellama.serve.app import ServerConfig, create_app

    for name, value in (("--max-batch", args.max_batch), ("--max-concurrent", args.max_concurrent),
                        ("--max-tokens", args.max_tokens), ("--context", args.context), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    check_lookup(args.lookup)
    if not 0 <= args.port <= 65535:  # uvicorn would fail with a traceback after loading the model
        raise UserError(f"--port must be in 0-65535, got {args.port}")
    sock = _bind(args.host, args.port)
    log_handler = _open_log(args.log_file)  # before the model loads: a log that cannot be written costs nothing
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else None)
    loaded = load_for_inference(args.model, device, dtype, args.quantize)
    # a --context past the trained one runs, as complete's --max-seq-len does (RoPE has no hard limit: Code
    # Llama keeps its perplexity to ~100k, spec 5.6 / 6.2), with the same warning; it was cut to the model's
    # context without a word
    context = args.context or min(4096, loaded.config.max_seq_len)
    warn_past_trained_context(args.context, loaded.config, "--context")
    _setup_logging(log_handler)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=args.max_batch, context_len=context,
                    compile=args.compile, reuse_prefixes=args.reuse_prefixes, lookup=args.lookup,
                    kv_dtype=kv_dtype(args.kv_cache))
    config = ServerConfig(args.model_name or model_name(args.model), args.api_key, args.max_concurrent, args.max_tokens,
                          suffix_first=args.spm, cors_origins=tuple(args.cors_origin))
    app = create_app(engine, config)

    import uvicorn

    compiling = " (compiling it: minutes the first time, less once cached)" if engine.decoder.compiled else ""
    print(f"warming up the decode step{compiling}", file=sys.stderr)
    engine.warm_up()
    # what lives as long as the server (the model, the tokenizer, FastAPI: ~180k objects) leaves the garbage
    # collector's generations: its full collections, every few thousand tokens served, no longer walk them
    gc.freeze()
    print(f"serving {config.model_name} ({loaded.source}) on http://{args.host}:{sock.getsockname()[1]}/v1 "
          f"[{device}, {args.max_batch} slots x {context} tokens, "
          f"KV cache {_cache_summary(loaded.model)}, "
          f"auth {'on' if config.api_key else 'off'}, "
          # llama.vscode and `suffix` requests need the infill tokens: said before a client finds out by a 400
          f"infilling {'on' if loaded.tokenizer is not None and loaded.tokenizer.can_infill else 'off'}]",
          file=sys.stderr)
    with engine:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def _cache_summary(model) -> str:
    """The KV cache as the engine allocated it (float16 for a quantised model on the CPU): its size, an int8
    cache's scales included, and dtype."""
    caches = [layer.attention.cache for layer in model.layers]
    gb = sum(c.kv.nbytes + c.scales.nbytes for c in caches) / 1e9
    return f"{gb:.2f} GB of {str(caches[0].kv.dtype).removeprefix('torch.')}"


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound to host:port before the model loads (uvicorn listens on it): a port in use
    or a host that is not this machine's ended the command only after loading and warming up (minutes for
    a big model), with uvicorn's message; and port 0's real port can be said."""
    import errno

    not_here = "give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}; {not_here}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's port is free
    try:
        sock.bind(addr)
        # listening now holds the port: a socket only bound does not, as SO_REUSEADDR lets another bind it
        # (and listen) until then; connections made while the model loads wait in the backlog
        sock.listen()
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: "another server? stop it or pick another --port",
                errno.EADDRNOTAVAIL: not_here,
                errno.EACCES: "ports below 1024 need privileges; pick another --port"}.get(e.errno, "")
        message = f"cannot listen on {host}:{port}: {e.strerror or e}" + (f"; {hint}" if hint else "")
        raise UserError(message) from None
    return sock


def _open_log(log_file: Path | None) -> logging.Handler | None:
    """The --log-file handler; UserError for a missing folder, a directory or no permission (was a traceback
    once the model had loaded)."""
    if log_file is None:
        return None
    try:
        return logging.FileHandler(log_file)
    except OSError as e:
        raise UserError(f"--log-file {log_file}: cannot open it for appending ({e.strerror or e})") from None


def _setup_logging(log_handler: logging.Handler | None) -> None:
    """Request logs are JSON lines on stderr (and through the --log-file handler)."""
    logger = logging.getLogger("codellama.serve")
    logger.setLevel(logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_handler is not None:
        handlers.append(log_handler)
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
