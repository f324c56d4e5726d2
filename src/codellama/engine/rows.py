"""One sequence's decoding state (RowState: stop ids, stop strings, streaming hold-back) and what it reports
(StreamEvent while it runs, Completion when it ends, TokenLogprob when asked for)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from codellama.errors import UserError
from codellama.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """The model's log-probability of a generated token, and the `top` most likely alternatives."""

    token: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Row i's log-probability of tokens[i] and its top[i] likeliest alternatives; logits [n, V]."""
    if not tokens:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    top_v, top_i = lp.topk(max(max(top), 1), dim=-1)
    chosen = lp.gather(1, torch.tensor(list(tokens), device=lp.device)[:, None])[:, 0].tolist()
    return [TokenLogprob(t, c, dict(zip(ti[:k], tv[:k])))
            for t, c, ti, tv, k in zip(tokens, chosen, top_i.tolist(), top_v.tolist(), top)]


@dataclass
class Completion:
    tokens: list[int]  # generated ids, without the stop token
    text: str
    finish_reason: str  # "stop" (stop token or string), "length", or "cancelled"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    # one per prompt token when asked for (None for the first, which nothing predicts): OpenAI's echo + logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0  # prompt tokens whose keys/values its slot held already (not prefilled again)


@dataclass
class StreamEvent:
    row: int  # the request's id (the index of the prompt in a Generator batch)
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


def check_prompt(i: int, n: int, context_len: int, remedy: str = "") -> None:
    """UserError unless a prompt of n tokens leaves room for at least one new token; `remedy` says what the
    caller can do about a prompt that is too long."""
    if n == 0:
        raise UserError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
    if n >= context_len:
        raise UserError(
            f"prompt {i} is {n} tokens, {n - context_len + 1} more than the context of "
            f"{context_len} allows (leave room for at least one new token)" + (f": {remedy}" if remedy else "")
        )


class RowState:
    """Decoding state of one sequence: its tokens, decoded text and how much of it was released."""

    def __init__(self, prompt_len: int, params: SamplingParams, stop_ids: set[int], max_new: int,
                 decode: Callable[[list[int]], str] | None = None, pieces: bool = True):
        self.prompt_len = prompt_len
        self.params = params
        self.stop_ids = stop_ids
        self.max_new = max_new
        self.decode = decode  # ids -> text; None: no text, so no stop strings either
        # the text extended after every token, to release it in pieces or to find stop strings in it; a row
        # read only once finished (pieces=False) without stop strings decodes it once, in completion() (when
        # each token decoded the whole text again: 16 rows of 64-token completions, 0.076 -> 0.007 ms a step)
        self._text_each_token = decode is not None and (pieces or bool(params.stop))
        # Incremental text (_extend_text): tokens[:_read] are decoded into _committed; the tokens from _window
        # (a token or two back, so that a tokenizer's treatment of a window's first token, SentencePiece's
        # leading space, is the same in both decodes) are decoded again with each new token, and what their
        # text gained over _window_text (theirs up to _read) is the new text
        self._incremental, self._committed, self._window, self._read, self._window_text = True, "", 0, 0, ""
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.cached_tokens = 0
        self.text = ""
        self.released = 0
        self.finish_reason: str | None = None

    @property
    def position(self) -> int:
        """Cache position of the last accepted token (the next decode step's input)."""
        return self.prompt_len + len(self.tokens) - 1

    def push(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Add a token; return the text that can now be released (never part of a possible stop string)."""
        if self.finish_reason is not None:  # finished: tokens past its end change nothing
            return ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            if logprob is not None:
                if self.logprobs is None:
                    self.logprobs = []
                self.logprobs.append(logprob)
            if self._text_each_token:
                kept = self._extend_text()  # stop strings that end past the text kept are new
                cut = min((i for s in self.params.stop
                           if (i := self.text.find(s, max(0, kept - len(s) + 1))) >= 0), default=-1)
                if cut >= 0:
                    self.text, self.finish_reason = self.text[:cut], "stop"
            if self.finish_reason is None and len(self.tokens) >= self.max_new:
                self.finish_reason = "length"
        end = len(self.text)
        if self.finish_reason is None:
            while end > self.released and self.text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                end -= 1
            # what comes before an incomplete character may be the start of a stop string it completes
            end -= longest_stop_prefix(self.text[:end], self.params.stop)
        delta, self.released = self.text[self.released : end], max(self.released, end)
        return delta

    def _extend_text(self) -> int:
        """self.text = the decoded tokens, decoding only the last few (the whole text again after every token
        cost O(its length): 0.29 ms a token at 2000 tokens of SmolLM2's tokenizer). Returns how much of the
        text is as it was before."""
        if self._incremental:
            window = self.decode(self.tokens[self._window :])
            # a tokenizer that rewrites earlier text (none of ours): decode it all from now on
            self._incremental = window.startswith(self._window_text)
        if not self._incremental:
            self.text = self.decode(self.tokens)
            return 0
        kept = len(self._committed)
        self.text = self._committed + window[len(self._window_text) :]
        if not self.text.endswith("\ufffd"):  # complete characters: the next window starts after these tokens
            chunk = self.decode(self.tokens[self._read :])
            # unless they decode to nothing (a piece decode drops, <s> or ▁<MID>, or a first ▁): a window starting
            # there would make the next piece its first and SentencePiece strip its space, which the whole keeps
            if chunk:
                self._window, self._window_text = self._read, chunk
            else:
                self._window_text = window  # the tokens from _window, as just decoded
            self._committed, self._read = self.text, len(self.tokens)
        return kept

    def completion(self) -> Completion:
        """The row's result, once it has finished (the scheduler sets finish_reason first)."""
        if self.decode is not None and not self._text_each_token:
            self.text = self.decode(self.tokens)
        return Completion(list(self.tokens), self.text, self.finish_reason or "length", self.prompt_len, self.logprobs,
                          self.prompt_logprobs, self.cached_tokens)
