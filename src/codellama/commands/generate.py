"""`codellama complete | infill | chat`: run a model from the command line, streaming text as it comes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codellama.config import DTYPE_CHOICES, QUANTIZE_CHOICES
from codellama.errors import UserError

QUANTIZE_HELP = ("weight-only quantised linear layers; auto: on the CPU a GGUF's quantised matrices stay the "
                 "file's codes, exactly its values; none: all floating point; int4: the file's codes and the rest "
                 "quantised to int4; int8: every layer quantised to int8 (faster CPU decoding; first use builds a "
                 "C++ kernel)")


def add_precision_args(p: argparse.ArgumentParser, quantize: str = "auto", why: str = "") -> None:
    """--dtype and --quantize, the same on every command that loads a model to generate; `why`: a note on
    a command's defaults."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help=f"weights dtype (default: float32 on CPU, half precision on GPU{why})")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=quantize,
                   help=f"{QUANTIZE_HELP} (default: {quantize}{why})")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="HF dir, Meta dir, .gguf file or preset name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    add_precision_args(p)


LOOKUP_MAX = 64  # guessed tokens per step: past a few dozen a wrong guess only costs more rows


def add_lookup_arg(p: argparse.ArgumentParser) -> None:
    """--lookup, the same on every command that decodes (engine/lookup.py)."""
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="greedy requests (temperature 0) guess up to N tokens per step by prompt lookup: tokens "
                   "that followed an earlier occurrence of the latest ones, checked in the same step; the output "
                   "is the same, in fewer steps when it repeats its context (code edits). CPU only; try 16 "
                   "(default: 0, off)")


KV_CACHE_DTYPES = ("float16", "float32", "int8")


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    """--kv-cache, the same on every command that decodes."""
    p.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default=None,
                   help="how the KV cache stores keys and values: int8 (CPU) takes half the memory of float16 and "
                   "reads faster over long contexts, within llama.cpp's q8_0 rounding (default: float16 for a "
                   "quantised model on the CPU, else the weights' dtype)")


def kv_dtype(name: str | None):
    """--kv-cache's torch dtype (None: the engine's choice)."""
    import torch

    return None if name is None else getattr(torch, name)


def check_lookup(n: int) -> None:
    if not 0 <= n <= LOOKUP_MAX:
        raise UserError(f"--lookup must be 0 (off) to {LOOKUP_MAX} guessed tokens per step, got {n}")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this times the likeliest, 0 to 1 (default: 0, off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token generated so far, -2 to 2 (OpenAI's; default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="times how often each token was generated so far, -2 to 2 (OpenAI's; default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides the positive logits of the prompt's and the generated tokens and multiplies the "
                        "negative ones (transformers'; 1.2 is common; default: 1, off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    add_lookup_arg(p)
    add_kv_cache_arg(p)


def register(sub) -> None:
    p = sub.add_parser("complete", help="continue a prompt")
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' or omitted: read stdin)")
    p.add_argument("--file", type=Path, help="read the prompt from a file ('-': stdin)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.2)  # Meta's example_completion default
    p.set_defaults(func=run_complete)

    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix")
    p.add_argument("--prefix", help="code before the gap")
    p.add_argument("--suffix", help="code after the gap (default: none)")
    p.add_argument("--file", type=Path, help="a file containing one <FILL_ME> marker ('-': stdin)")
    p.add_argument("--spm", action="store_true", help="suffix-prefix-middle order (default: prefix-suffix-middle)")
    p.add_argument("--full", action="store_true", help="print prefix + middle + suffix instead of the middle")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0)  # Meta's example_infilling default: greedy
    p.set_defaults(func=run_infill)

    p = sub.add_parser("chat", help="chat with an instruct model (one message, or interactive without one)")
    p.add_argument("message", nargs="?",
                   help="a single user message ('-': read it from stdin); omit for an interactive session")
    p.add_argument("--system", default=None, help="system prompt")
    add_model_args(p)
    add_sampling_args(p, temperature=0.2)
    p.set_defaults(func=run_chat)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, stop=tuple(args.stop), seed=args.seed,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty)


def _load(args):
    import torch

    from codellama.generate import load
    from codellama.sampling import SamplingParams

    SamplingParams(**_sampling(args))  # reject bad values before loading anything
    check_lookup(args.lookup)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load(args.model, device=args.device, dtype=dtype, max_seq_len=args.max_seq_len, quantize=args.quantize,
                lookup=args.lookup, kv_dtype=kv_dtype(args.kv_cache))


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _EchoFirst:
    """Prints `head` (the prompt, echoed) before the first text: once the model has accepted the prompt, so a
    refused one (too long for the context) leaves stdout empty instead of holding the prompt and no answer."""

    def __init__(self, head: str):
        self.head: str | None = head

    def __call__(self, text: str) -> None:
        if self.head is not None:
            text, self.head = self.head + text, None
        _emit(text)


def _read_stdin(what: str) -> str:
    if sys.stdin.isatty():  # else the command would wait silently
        print(f"reading {what} from the terminal; end it with Ctrl-D", file=sys.stderr)
    return sys.stdin.read()


def _read_text(path: Path) -> str:
    if str(path) == "-":  # the usual name for stdin, e.g. an editor piping the buffer in
        return _read_stdin("the text")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def run_complete(args) -> int:
    if args.file is not None:
        if args.prompt is not None:
            raise UserError("give the prompt as text or with --file, not both")
        prompt = _read_text(args.file)
    elif args.prompt is None or args.prompt == "-":
        prompt = _read_stdin("the prompt")  # a bare `codellama complete` too
    else:
        prompt = args.prompt
    if not prompt:
        raise UserError("the prompt is empty: pass text, --file, or pipe it on stdin")
    gen = _load(args)
    echo = _EchoFirst(prompt)
    gen.complete(prompt, on_text=echo, **_sampling(args))
    echo("\n")
    return 0


def run_infill(args) -> int:
    from codellama.prompts import split_fill_me

    if args.file is not None:
        if args.prefix is not None or args.suffix is not None:
            raise UserError("give --prefix/--suffix or --file with a <FILL_ME> marker, not both")
        prefix, suffix = split_fill_me(_read_text(args.file))
    elif args.prefix is not None:
        prefix, suffix = args.prefix, args.suffix or ""
    else:
        raise UserError("give --prefix (and --suffix), or --file with a <FILL_ME> marker")
    gen = _load(args)
    echo = _EchoFirst(prefix if args.full else "")
    gen.infill(prefix, suffix, suffix_first=args.spm, on_text=echo, **_sampling(args))
    echo(suffix if args.full else "\n")
    return 0


def run_chat(args) -> int:
    message = None
    if args.message is not None:
        message = _read_stdin("the message") if args.message == "-" else args.message  # e.g. a file with blank lines
        if not message.strip():  # e.g. `chat "$MSG"` with MSG unset: the model would answer nothing, at length
            raise UserError("the message is empty: pass text, '-' to read it from stdin, or no message for an "
                            "interactive chat")
    gen = _load(args)
    dialog = [{"role": "system", "content": args.system}] if args.system else []
    if message is not None:
        dialog.append({"role": "user", "content": message})
        gen.chat(dialog, on_text=_emit, **_sampling(args))
        _emit("\n")
        return 0
    print("interactive chat: an empty line or Ctrl-D ends it, /reset clears the history, Ctrl-C stops an answer",
          file=sys.stderr)
    history = list(dialog)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = list(dialog)
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = gen.chat(history, on_text=_emit, **_sampling(args))
        except UserError as e:  # a refused message must not end the session
            history.pop()
            hint = "; /reset clears the history" if len(history) > len(dialog) else ""
            print(f"error: {e}{hint}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session with its history
            history.pop()
            print("\n(interrupted: that message and its answer are left out of the history)", file=sys.stderr)
            continue
        _emit("\n")
        history.append({"role": "assistant", "content": answer})
    return 0
