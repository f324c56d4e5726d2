"""Sampling settings and the next-token sampler, vectorised over rows that each carry their own settings."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from codellama.engine.host import staging, to_device
from codellama.engine.kernels import argmax_rows
from codellama.errors import UserError

# top_k is held in an int64 tensor, and a seed must fit torch.Generator.manual_seed (int64 or uint64): a
# value beyond these would fail only when the batch is built, inside the engine
_TOP_K_LIMIT = 2**63
_SEED_RANGE = range(-(2**63), 2**64)
# OpenAI's ranges, either way from 0: presence_penalty and frequency_penalty, and a logit_bias value
PENALTY_LIMIT = 2
BIAS_LIMIT = 100
# repetition_penalty's largest (vLLM sets none): beyond it every seen token is all but banned anyway
REPETITION_LIMIT = 100


@dataclass
class SamplingParams:
    """How one sequence is decoded. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # an extension (vLLM, llama.cpp, transformers): drop tokens less likely than min_p times the likeliest
    # (after temperature, top-k and top-p); 0: off
    min_p: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's end-of-turn ids
    seed: int | None = None
    # OpenAI's: logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0), count[j] being
    # how often token j was generated so far (not in the prompt); then logit_bias[j] is added
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # an extension (transformers' and vLLM's, from the CTRL paper): the logit of every token in the prompt or
    # generated so far is divided by it where positive and multiplied by it where negative; 1: off
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.stop = () if self.stop is None else _as_tuple(self.stop)  # None: OpenAI's "stop": null
        if self.stop_ids is not None:
            self.stop_ids = _as_tuple(self.stop_ids)
        if self.logit_bias is None:  # OpenAI's "logit_bias": null
            self.logit_bias = {}
        elif isinstance(self.logit_bias, Mapping):  # a copy: the caller's dict may change later
            self.logit_bias = dict(self.logit_bias)
        self.validate()

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or biases change this row's logits (rows that do cost [V] work per step)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1)

    def check_vocab(self, vocab_size: int) -> None:
        """UserError naming the first logit_bias id past a vocabulary of vocab_size tokens."""
        bad = next((t for t in self.logit_bias if t >= vocab_size), None)
        if bad is not None:
            raise UserError(f"logit_bias has token id {bad}, outside the model's vocabulary of {vocab_size} "
                            f"(ids 0 to {vocab_size - 1})")

    def validate(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < _TOP_K_LIMIT:
            raise UserError(f"top_k must be an integer >= 0 (0 = off) and below 2**63, got {self.top_k!r}")
        if not _is_number_within(self.min_p, 1) or self.min_p < 0:
            raise UserError(f"min_p must be a number from 0 to 1 (0: off), got {self.min_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"stop sequences must be non-empty strings, got {list(self.stop)!r}")
        if self.stop_ids is not None and not all(_is_int(t) for t in self.stop_ids):
            raise UserError(f"stop_ids must be token ids (integers), got {list(self.stop_ids)!r}")
        if self.seed is not None and not (_is_int(self.seed) and self.seed in _SEED_RANGE):
            raise UserError(f"seed must be an integer in [-2**63, 2**64) (None: not reproducible), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number_within(getattr(self, name), PENALTY_LIMIT):
                raise UserError(f"{name} must be a number from -{PENALTY_LIMIT} to {PENALTY_LIMIT} (0: off), "
                                f"got {getattr(self, name)!r}")
        if not _is_number_within(self.repetition_penalty, REPETITION_LIMIT) or self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be a number above 0 and at most {REPETITION_LIMIT} (1: off), "
                            f"got {self.repetition_penalty!r}")
        self._validate_logit_bias()

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, dict):
            raise UserError(f"logit_bias must map token ids to biases, got {self.logit_bias!r:.80}")
        for token, bias in self.logit_bias.items():
            if not (_is_int(token) and token >= 0):
                raise UserError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not _is_number_within(bias, BIAS_LIMIT):
                raise UserError(f"logit_bias values must be numbers from -{BIAS_LIMIT} to {BIAS_LIMIT}, got "
                                f"{bias!r} for token {token}")


def _as_tuple(x) -> tuple:
    """A sequence as a tuple; one value alone (a string, an id) as a tuple of it, checked by validate()."""
    return tuple(x) if isinstance(x, Iterable) and not isinstance(x, str) else (x,)


def _is_int(x) -> bool:
    """An integer proper: True and 2.0 are not token counts, ids or seeds."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number_within(x, limit: float) -> bool:
    """A real number (not a bool) in [-limit, limit]; NaN is not."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and -limit <= x <= limit


def penalized(
    logits: torch.Tensor,
    counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    bias: torch.Tensor | None = None,
    repetition: torch.Tensor | None = None,
    in_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """The repetition penalty (transformers'), then OpenAI's penalties and logit_bias:
    logits - frequency * counts - presence * (counts > 0) + bias.

    logits, counts (how often each token was generated so far), bias, in_prompt (bool: the prompt's tokens):
    [P, V]; presence, frequency, repetition: [P, 1]."""
    if repetition is not None:  # vLLM's order: before the others
        seen = in_prompt | (counts > 0)  # [P, V]
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    out = logits - frequency * counts - presence * (counts > 0)  # [P, V]
    return out if bias is None else out + bias


@dataclass
class TokenHistory:
    """The tokens each cache slot's row has seen, for penalties; on the device, so counting needs no sync."""

    generated: torch.Tensor  # [S, V] float32: how often each token was generated (OpenAI's count)
    in_prompt: torch.Tensor  # [S, V] bool: the prompt's tokens (the repetition penalty counts them too)

    @classmethod
    def empty(cls, slots: int, vocab: int, device: torch.device) -> TokenHistory:
        if device.type == "cuda":
            staging(device)  # now, not first while a step runs: starting a row and building samplers copy through it
        return cls(torch.zeros(slots, vocab, device=device), torch.zeros(slots, vocab, dtype=torch.bool, device=device))

    def start(self, slot: int, prompt: Sequence[int]) -> None:
        """A new row in `slot`: nothing generated yet, and `prompt` seen."""
        self.generated[slot].zero_()
        self.in_prompt[slot].zero_()
        self.in_prompt[slot].index_fill_(0, to_device(prompt, self.in_prompt.device), True)


@dataclass
class Penalties:
    """The rows of a batch whose logits penalties or biases change, and the history they are penalised by.

    Everything stays on the device: applying and counting read nothing back (no GPU sync)."""

    rows: torch.Tensor  # [P] int64: the rows' indexes in the batch
    slots: torch.Tensor  # [P] int64: each row's line in history
    history: TokenHistory  # the caller's (started for a new row)
    presence: torch.Tensor  # [P, 1] float32
    frequency: torch.Tensor  # [P, 1] float32
    bias: torch.Tensor | None  # [P, V] float32; None when no row has one
    repetition: torch.Tensor | None  # [P, 1] float32; None when no row has one

    @classmethod
    def build(
        cls, params: list[SamplingParams], device: torch.device, history: TokenHistory, slots: list[int]
    ) -> Penalties | None:
        """The rows of `params` that adjust their logits (None: no row does), row i's history in line slots[i]."""
        rows = [i for i, p in enumerate(params) if p.adjusts_logits]
        if not rows:
            return None
        bias, vocab = None, history.generated.shape[1]
        pairs = [(k * vocab + token, b) for k, i in enumerate(rows) for token, b in params[i].logit_bias.items()]
        if pairs:
            at, values = zip(*pairs)  # flat indexes into [P, V]: index_copy_ queues without a sync
            bias = torch.zeros(len(rows), vocab, device=device)  # [P, V]
            bias.view(-1).index_copy_(0, to_device(at, device), to_device(values, device, torch.float32))

        def column(name: str) -> torch.Tensor:  # [P, 1]
            return to_device([getattr(params[i], name) for i in rows], device, torch.float32)[:, None]

        return cls(
            rows=to_device(rows, device),
            slots=to_device([slots[i] for i in rows], device),
            history=history,
            presence=column("presence_penalty"),
            frequency=column("frequency_penalty"),
            bias=bias,
            repetition=column("repetition_penalty") if any(params[i].repetition_penalty != 1 for i in rows) else None,
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> a copy with these rows adjusted (the model's own stay as they are, for logprobs)."""
        in_prompt = None if self.repetition is None else self.history.in_prompt[self.slots]
        adjusted = penalized(logits[self.rows], self.history.generated[self.slots], self.presence, self.frequency,
                             self.bias, self.repetition, in_prompt)
        return logits.index_copy(0, self.rows, adjusted)  # [B, V]

    def count(self, tokens: torch.Tensor) -> None:
        """Add each row's new token (tokens [B]) to its history."""
        generated = self.history.generated
        at = self.slots * generated.shape[1] + tokens[self.rows]  # [P] flat indexes into generated
        generated.view(-1).index_add_(0, at, torch.ones(at.shape, device=at.device))


@dataclass
class RowSampler:
    """Per-row sampling state: settings as tensors, plus one random generator per seeded row."""

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    min_p: torch.Tensor  # [B] float32
    generators: list[torch.Generator | None] = field(default_factory=list)
    # Decided on the host when built, so sampling never reads a device tensor back (no GPU sync).
    all_greedy: bool = False
    unfiltered: bool = False  # no row uses top-p, top-k or min-p
    penalties: Penalties | None = None  # None: no row has penalties or biases (no [B, V] work for them)

    @staticmethod
    def generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
        """The random stream of one seeded row (None: the global one)."""
        if params.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(params.seed)
        return g

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        device: torch.device,
        generators: list[torch.Generator | None] | None = None,
        history: TokenHistory | None = None,
        slots: list[int] | None = None,
    ) -> RowSampler:
        """A sampler for rows with these settings; pass `generators` to continue rows' existing streams.

        Rows with penalties or biases need a `history` (started for a new row): row i counts the tokens it
        generates in its line slots[i] (default: line i) and is penalised by them."""
        gens = [cls.generator(p, device) for p in params] if generators is None else list(generators)
        penalties = None
        if any(p.adjusts_logits for p in params):
            if history is None:
                raise ValueError("rows with penalties or logit_bias need the `history` of the tokens they saw")
            penalties = Penalties.build(params, device, history, list(range(len(params))) if slots is None else slots)
        return cls(
            temperature=to_device([p.temperature for p in params], device, torch.float32),
            top_p=to_device([p.top_p for p in params], device, torch.float32),
            top_k=to_device([p.top_k for p in params], device),
            min_p=to_device([p.min_p for p in params], device, torch.float32),
            generators=gens,
            all_greedy=all(p.temperature == 0 for p in params),
            unfiltered=all(p.top_p >= 1 and p.top_k == 0 and p.min_p == 0 for p in params),
            penalties=penalties,
        )

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> next tokens [B], after the rows' penalties and biases (greedy rows too);
        the tokens are added to the history of the rows that have them."""
        if self.penalties is None:
            return self._draw(logits)
        tokens = self._draw(self.penalties.apply(logits))
        self.penalties.count(tokens)
        return tokens

    @property
    def plain_greedy(self) -> bool:
        """Whether sampling is each row's argmax and nothing else (no sampled row, no penalty or bias)."""
        return self.all_greedy and self.penalties is None

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        greedy = argmax_rows(logits)
        if self.all_greedy:
            return greedy
        probs = filtered_probs(logits, self.temperature, self.top_p, self.top_k, self.unfiltered,
                               min_p=self.min_p)  # [B, V]
        # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p without a host sync.
        noise = torch.empty_like(probs)
        if not any(self.generators):  # no seeded row: one draw from the global stream (one kernel, not B)
            noise.exponential_()
        else:
            for row, gen in enumerate(self.generators):
                noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(-1)
        return torch.where(self.temperature == 0, greedy, sampled)


def filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    unfiltered: bool | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of logits/T restricted to the top-k tokens, the top-p nucleus and the tokens at least min_p
    times as likely as the likeliest, per row (temperature, top_k, top_p, min_p: [B]; min_p None: off).

    The nucleus rule is Meta's: drop a token when the mass of the tokens ranked above it already exceeds p.
    `unfiltered` (known on the host) skips the sort when no row filters; None reads it from the tensors.
    """
    # a greedy row (T = 0) is divided by a small number instead of 0: its sample is replaced by the argmax
    scaled = logits / temperature.clamp(min=1e-5)[:, None]  # [B, V]
    if unfiltered is None:
        unfiltered = bool((top_p >= 1).all()) and bool((top_k == 0).all()) and (min_p is None or not min_p.any())
    if unfiltered:
        return torch.softmax(scaled, dim=-1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    drop = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_above = sorted_probs.cumsum(-1) - sorted_probs
    # top_p 1 is off: the float32 cumsum can pass 1 before the tail, and then it dropped the tail's tokens
    drop |= (mass_above > top_p[:, None]) & (top_p[:, None] < 1)
    if min_p is not None:  # the likeliest token is the first, and never dropped
        drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
