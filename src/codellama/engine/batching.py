"""Continuous batching: requests join and leave a running batch between decode steps.

`Scheduler` is the synchronous core, driven by `step()`: it owns the model's slot cache, prefills each
waiting request into a free slot, then decodes one token for every active request together, each with
its own sampling settings, stop conditions and length. A finished or cancelled request frees its slot at
once. `Generator.stream_generate` drives one directly; `Engine` runs one on a background thread for the
server, with thread-safe `submit`/`cancel` and an asyncio-friendly `stream`.

Every request is prefilled into its own slot (requests admitted in the same step share prefill calls
where the decoder can) and decoded at its own positions, so its greedy tokens do not depend on which
other requests share the batch. A request goes to the free slot that holds the longest start of its prompt
(engine/decode.py: prefix reuse), when that is MIN_REUSED_TOKENS or more, else to the lowest empty free slot,
else to the free slot whose record is oldest.

Overlap (the default on a GPU): the host reads a step's sampled tokens only after it has queued the next
step, fed with those tokens on the device, so the GPU does not wait for the host's work between steps
(1-2 ms per token on an H200 when each step was read at once, BENCHMARKS.md). A row that stops on a stop
token or string has one step computed past its end, which is discarded; rows ending by length are known
ahead and skipped. The chain pauses for one step whenever waiting requests can be admitted.

Prefill in chunks (the CPU's fused step): a prompt admitted while other requests decode is prefilled
PREFILL_TOKENS_PER_STEP tokens a step, between their steps, so they keep streaming: a 4096-token prompt's
prefill takes seconds on a CPU, all of which they waited before. Each chunk extends what its slot holds
and the next one starts there (prefix reuse, engine/decode.py), so the result is a whole prefill's up to
float rounding (the rows went through the matmuls in other groups). With no other request decoding, every
admitted prompt is prefilled whole, at once: nobody waits on it.

Prompt lookup (`lookup` > 0, where a step runs exactly the active rows: the CPU's fused step): a greedy
request whose last tokens occurred earlier in its prompt or output gets up to `lookup` guessed tokens
(engine/lookup.py) fed after its own in the same step, one row each; the step's logits then check the
guesses, and every one that equals the model's choice adds a token. The tokens are those of one step per
token (up to the float rounding of a near-tie: the guessed rows go through the matmuls together). Requests
that sample, want logprobs, or have penalties or logit biases (whose logits change with every token they
take) take one token per step as before.

Penalties and logit biases (OpenAI's presence_penalty, frequency_penalty, logit_bias; repetition_penalty): the
scheduler keeps each such request's history in [slots, V] tensors on the device (sampling.TokenHistory): its
prompt's tokens, set when the request takes its slot, and counts of its generated tokens, updated as they are
sampled, so a chained step (overlap) is penalised by the token the host has not read yet. They are made for the
first such request; batches without them do no [B, V] work for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from codellama.engine.decode import MIN_REUSED_TOKENS, Decoder
from codellama.engine.host import HostTokens, to_device
from codellama.engine.kernels import torch_on_one_thread
from codellama.engine.lookup import draft
from codellama.engine.rows import Completion, RowState, StreamEvent, TokenLogprob, check_prompt, token_logprobs
from codellama.model import Transformer
from codellama.sampling import RowSampler, SamplingParams, TokenHistory

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Prompt tokens prefilled per step while other requests decode (module docstring). SmolLM2 on 2 cores, 4
# requests decoding while a 2000-token prompt arrives (bench/bench_prefill_stall.py): their longest wait 2.04 s
# whole, 660 ms in chunks of 512, 384 of 256, 226 of 128; the prompt's first token 2.04 s whole, +0.5%, +3%, +22%.
PREFILL_TOKENS_PER_STEP = 256


@dataclass(eq=False)
class Request:
    """One prompt's generation in a Scheduler, from submit() until its Completion."""

    id: int
    prompt: list[int]
    params: SamplingParams
    row: RowState
    logprobs: int | None  # None: off; k: the chosen token's logprob and the top k alternatives
    on_event: Callable[[StreamEvent], None] | None = None
    generator: torch.Generator | None = None
    prompt_logprobs: bool = False  # also score the prompt's tokens (with `logprobs` alternatives)
    guesses: int = 1  # prompt lookup: how many tokens its next step may guess (grows while guesses hold)
    reused: int | None = None  # prompt tokens its first prefill chunk found in the cache (usage's cached_tokens)
    slot: int | None = None
    finished: bool = False
    cancelled: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (safe from any thread)."""
        self.cancelled = True


@dataclass(eq=False)
class Launched:
    """One step's output for its rows, sampled on the device and not yet accepted by the host."""

    rows: list[Request]
    logits: torch.Tensor  # [n, V] float32
    tokens: torch.Tensor  # [n] sampled next tokens, on the device
    host: HostTokens


Events = list[tuple[Request, StreamEvent]]  # what a step reports, in order: each event with its request


class Scheduler:
    """Continuous batching over a Decoder's slots, one step() at a time (see the module docstring)."""

    def __init__(
        self,
        decoder: Decoder,
        context_len: int | None = None,
        stop_ids: Sequence[int] = (),
        overlap: bool | None = None,
        lookup: int = 0,
    ):
        self.decoder = decoder
        self.device = decoder.device
        self.overlap = self.device.type == "cuda" if overlap is None else overlap  # see the module's docstring
        if lookup < 0:
            raise ValueError(f"lookup is a number of guessed tokens per step (0: off), got {lookup}")
        # guessed tokens per greedy row and step (module docstring); only where a step runs exactly its rows
        self.lookup = lookup if decoder.steps_exact_slots and not self.overlap else 0
        if lookup and not self.lookup:
            _warn_once("prompt lookup needs the CPU's fused decode step (a float32 model on the CPU); decoding "
                       "one token per step")
        self._pending: Launched | None = None  # the step queued but not yet read (overlap only)
        # prompts prefilled a chunk a step where the next chunk can start from what the last one left
        self.chunk_prefills = decoder.steps_exact_slots and decoder.reuse_prefixes and not self.overlap
        ctx = context_len or decoder.model.config.max_seq_len
        self.context_len = min(ctx, decoder.max_seq_len)  # longest prompt + completion one slot holds
        self.default_stop_ids = set(stop_ids)
        self.waiting: deque[Request] = deque()  # appended from any thread, popped by step()
        # submitted and not finished: one set, so a count read from another thread is exact even while
        # step() moves requests from waiting to active
        self.unfinished: set[Request] = set()
        self.active: list[Request] = []  # sorted by slot
        self.prefilling: list[Request] = []  # holding a slot, their prompts partly prefilled; oldest first
        self.free_slots = list(range(decoder.max_batch))  # a heap: the lowest slot first keeps rows packed
        self._ids = itertools.count()
        self._sampler: tuple[tuple[int, ...], RowSampler] | None = None
        self._history: TokenHistory | None = None  # what each slot's row saw, for penalties
        self.finished = Counter()  # finish reason -> requests, over the scheduler's life

    # ---- requests ----
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        decode: Callable[[list[int]], str] | None = None,
        logprobs: int | None = None,
        on_event: Callable[[StreamEvent], None] | None = None,
        request_id: int | None = None,
        prompt_logprobs: bool = False,
        pieces: bool = True,
    ) -> Request:
        """Queue a request (UserError for an empty or too long prompt); it joins at the next step.

        prompt_logprobs: its Completion also carries each prompt token's logprob (OpenAI's echo + logprobs).
        pieces=False: nobody reads its text before it finishes (a response sent in one piece); its events
        then carry no text but the Completion's, the first token's still reported (its time)."""
        prompt = list(prompt)
        check_prompt(len(self.waiting) if request_id is None else request_id, len(prompt), self.context_len)
        params.check_vocab(self.decoder.model.config.vocab_size)
        rid = next(self._ids) if request_id is None else request_id
        stop_ids = set(params.stop_ids) if params.stop_ids is not None else self.default_stop_ids
        max_new = min(params.max_new_tokens, self.context_len - len(prompt))
        row = RowState(len(prompt), params, stop_ids, max_new, decode, pieces)
        req = Request(rid, prompt, params, row, logprobs, on_event, RowSampler.generator(params, self.device),
                      prompt_logprobs)
        self.unfinished.add(req)
        self.waiting.append(req)
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.active or self._pending)

    # ---- the loop body ----
    @torch.inference_mode()
    def step(self) -> Events:
        """Admit waiting requests into free slots and prefill their prompts (or a chunk of them, module
        docstring), then decode one token for every active request.

        With overlap, the tokens decoded by one call are accepted (and their events returned) by the next.
        """
        events: Events = []
        for req in [r for r in self.active + self.prefilling if r.cancelled]:
            self._finish(req, "cancelled", events)
        # a queued request cancelled while every slot is busy finishes now: it must not count against the
        # server's limit (stats()["unfinished"]) until a slot frees. list(): other threads append meanwhile.
        for req in [r for r in list(self.waiting) if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled", events)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if not (self.waiting and self.free_slots):  # nothing to admit: queue the next step first
                self._pending = self._chain(pending)
            self._accept(pending, events)
            if self._pending is not None:
                return events
        self.prefilling += self._admit(events)
        if self.prefilling:
            self._advance_prefills(events)
        if self.active:
            rows = list(self.active)
            guesses = {r.id: guess for r in rows if (guess := self._guess(r))}
            if guesses:
                self._speculate(rows, guesses, events)
                return events
            launched = self._decode(rows, [r.row.tokens[-1] for r in rows], [r.row.position for r in rows])
            if self.overlap:
                self._pending = launched
            else:
                self._accept(launched, events)
        return events

    def _admit(self, events: Events) -> list[Request]:
        """Waiting requests given the free slots, lowest slot first; a cancelled one finishes instead."""
        admitted = []
        if self.waiting and self.free_slots:
            self.decoder.forget_if_weights_changed()  # before choosing slots by what they hold
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            if req.cancelled:
                self._finish(req, "cancelled", events)
                continue
            req.slot = self._slot_for(req.prompt)
            if req.params.adjusts_logits:  # a new row: its prompt seen, nothing generated yet
                self._token_history().start(req.slot, req.prompt)
            admitted.append(req)
        return admitted

    def _advance_prefills(self, events: Events) -> None:
        """Prefill the admitted prompts: all of them whole when no request is decoding (or chunks do not
        apply), else PREFILL_TOKENS_PER_STEP tokens of them, the oldest first. A prompt whose prefill ends
        here takes its first token and joins the decoding rows."""
        done = []
        if not self.active or not self.chunk_prefills:
            done, self.prefilling = self.prefilling, []
        else:
            self.decoder.forget_if_weights_changed()  # what the slots hold must be true before counting on it
            budget = PREFILL_TOKENS_PER_STEP
            for req in list(self.prefilling):
                reused = self.decoder.reused([req.prompt], [req.slot])[0]
                if req.reused is None:
                    req.reused = reused
                rest = len(req.prompt) - reused
                if rest > budget and not req.prompt_logprobs:  # (a scored prompt's prefill is one pass)
                    self._prefill_chunk(req, reused + budget, events)
                    break
                self.prefilling.remove(req)
                done.append(req)
                budget -= rest
                if budget <= 0:
                    break
        if done:
            self.active = sorted(self.active + done, key=lambda r: r.slot)
            self._prefill(done, events)

    def _prefill_chunk(self, req: Request, end: int, events: Events) -> None:
        """Prefill the request's prompt up to `end` (its slot then holds prompt[:end]); a prompt that breaks
        the model fails alone."""
        try:
            self.decoder.prefill([req.prompt[:end]], [req.slot])
        except Exception:
            log.exception("request %s: prefill failed", req.id)
            self._finish(req, "error", events)

    def _slot_for(self, prompt: list[int]) -> int:
        """Take the free slot holding the longest start of the prompt if that is worth it; else the lowest
        free slot holding nothing, else the one whose record is oldest (an editor's file outlives a few
        other requests). Where steps run slots 0..n-1 (GPU), a slot above the busy ones costs every step a
        row: the choice is among the free slots below them, or else the lowest free slot alone."""
        reusable = {s: self.decoder.reusable(prompt, s) for s in self.free_slots}
        best = max(reusable, key=lambda s: (reusable[s], -s))
        if reusable[best] < MIN_REUSED_TOKENS:
            candidates = list(reusable)
            if not self.decoder.steps_exact_slots:
                busy = set(range(self.decoder.max_batch)) - set(self.free_slots)
                candidates = [s for s in candidates if s < max(busy, default=-1)] or [min(candidates)]
            held = self.decoder.held  # oldest record first
            empty = [s for s in candidates if s not in held]
            best = min(empty) if empty else next(s for s in held if s in candidates)
        self.free_slots.remove(best)
        heapq.heapify(self.free_slots)
        return best

    def _decode(self, rows: list[Request], tokens: Sequence[int] | torch.Tensor, positions: list[int]) -> Launched:
        logits = self.decoder.decode([r.slot for r in rows], tokens, positions)  # [b, V]
        return self._sample(rows, logits)

    def _guess(self, req: Request) -> list[int]:
        """Tokens to check after the request's next input by prompt lookup (module docstring); [] for none."""
        # a penalised row's logits change with each token it takes: its guesses would be checked against the
        # logits before them
        if not self.lookup or req.params.temperature > 0 or req.logprobs is not None or req.params.adjusts_logits:
            return []
        room = min(req.guesses, req.row.max_new - len(req.row.tokens) - 1,  # tokens it may still take
                   self.decoder.model.cache_shape[1] - 2 - req.row.position)  # the last position is the steps'
        return draft(req.prompt + req.row.tokens, room) if room > 0 else []

    def _speculate(self, rows: list[Request], guesses: dict[int, list[int]], events: Events) -> None:
        """One step in which each row feeds its next input and then its guesses, one row per token at
        consecutive positions of its slot; every guess equal to the greedy choice before it adds a token."""
        slots, tokens, positions, first = [], [], [], []
        for r in rows:
            fed = [r.row.tokens[-1], *guesses.get(r.id, ())]
            first.append(len(tokens))
            slots += [r.slot] * len(fed)
            tokens += fed
            positions += range(r.row.position, r.row.position + len(fed))
        logits = self.decoder.decode(slots, tokens, positions)  # [len(tokens), V]
        with torch_on_one_thread(self.device):
            own = logits[first]  # [len(rows), V]
            choices = logits.argmax(-1).tolist()  # the greedy token after each fed one
        self._accept(self._sample(rows, own), events)  # each row's own next token, as a plain step
        for r, i in zip(rows, first):
            guess = guesses.get(r.id)
            if not guess or r.finished:
                continue
            held = 0
            for g, after in zip(guess, choices[i + 1 :]):
                if g != r.row.tokens[-1] or r.finished:  # a wrong guess: what follows it was computed for nothing
                    break
                self._push(r, after, None, events)
                held += 1
            # a guessed row costs about half a step on the CPU: guess one further after a step whose guesses
            # all held, and after a wrong one only as far as this guess held
            r.guesses = min(self.lookup, len(guess) + 1) if held == len(guess) else max(1, held)

    def _chain(self, pending: Launched) -> Launched | None:
        """The next step for the pending step's rows, fed with its sampled tokens while still on the device.

        Rows already finished, or whose pending token is their last by length, are left out."""
        keep = [i for i, r in enumerate(pending.rows) if not r.finished and len(r.row.tokens) + 1 < r.row.max_new]
        if not keep:
            return None
        tokens = pending.tokens
        if len(keep) < len(pending.rows):
            tokens = tokens[to_device(keep, tokens.device)]
        rows = [pending.rows[i] for i in keep]
        return self._decode(rows, tokens, [r.row.position + 1 for r in rows])

    def _prefill(self, reqs: list[Request], events: Events) -> None:
        """Prefill the admitted requests together; a prompt that breaks the model fails alone."""
        try:
            logits = self._prefill_logits(reqs)  # [n, V]
        except Exception:
            if len(reqs) > 1:  # find the culprit: one at a time
                for req in reqs:
                    self._prefill([req], events)
                return
            log.exception("request %s: prefill failed", reqs[0].id)
            self._finish(reqs[0], "error", events)  # its slot is simply freed
            return
        self._accept(self._sample(reqs, logits), events)

    def _prefill_logits(self, reqs: list[Request]) -> torch.Tensor:
        """Logits after each prompt [n, V]; requests that score their prompt are prefilled one by one."""
        last: dict[int, torch.Tensor] = {}
        plain = [r for r in reqs if not r.prompt_logprobs]
        if plain:
            for r, n in zip(plain, self.decoder.reused([r.prompt for r in plain], [r.slot for r in plain])):
                r.row.cached_tokens = n if r.reused is None else r.reused  # not its own earlier chunks
            last.update(zip((r.id for r in plain), self.decoder.prefill([r.prompt for r in plain],
                                                                        [r.slot for r in plain])))
        for r in reqs:
            if r.prompt_logprobs:
                last[r.id], r.row.prompt_logprobs = self.decoder.score_prompt(r.prompt, r.slot, r.logprobs or 0)
        with torch_on_one_thread(self.device):
            return torch.stack([last[r.id] for r in reqs])

    def abort_all(self, reason: str = "error") -> Events:
        """Finish every request (after a failed step), freeing all slots."""
        self._pending = None
        events: Events = []
        for req in list(self.active) + list(self.prefilling) + list(self.waiting):
            self._finish(req, reason, events)
        self.waiting.clear()
        return events

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> Launched:
        sampler = self._sampler_for(rows)
        # a plain greedy batch's argmax runs on the CPU kernels' threads (engine/kernels.argmax_rows); holding
        # torch to one thread would hold them to one too (0.4 ms of a 16-row step)
        with contextlib.nullcontext() if sampler.plain_greedy else torch_on_one_thread(self.device):
            tokens = sampler.sample(logits)  # [n] on the device
        return Launched(rows, logits, tokens, HostTokens(tokens))

    def _accept(self, step: Launched, events: Events) -> None:
        tokens = step.host.wait()  # the one host sync per step
        with torch_on_one_thread(self.device):
            lps = self._logprobs(step.rows, step.logits, tokens)
        for req, token, lp in zip(step.rows, tokens, lps):
            if req.finished:  # stopped or cancelled while this step ran (overlap): its token is past the end
                continue
            self._push(req, token, lp, events)

    def _push(self, req: Request, token: int, lp: TokenLogprob | None, events: Events) -> None:
        delta = req.row.push(token, lp)
        if req.row.finish_reason is not None:
            self._finish(req, req.row.finish_reason, events, delta)
        elif delta or len(req.row.tokens) == 1:  # the first token is reported, text or not: its time
            events.append((req, StreamEvent(req.id, delta, None)))

    def _finish(self, req: Request, reason: str, events: Events, delta: str = "") -> None:
        if req.finished:
            return
        req.finished = True
        self.unfinished.discard(req)
        req.row.finish_reason = req.row.finish_reason or reason
        self.finished[req.row.finish_reason] += 1
        if req.slot is not None:
            if req in self.prefilling:  # its slot's record is what its chunks prefilled
                self.prefilling.remove(req)
            else:
                # what was fed back: every token but the last (no step took it as input); unless its record is
                # gone (an error, or the weights changed)
                if reason != "error" and req.slot in self.decoder.held:
                    self.decoder.hold(req.slot, req.prompt + req.row.tokens[:-1])
                self.active.remove(req)
            heapq.heappush(self.free_slots, req.slot)
            req.slot = None
        events.append((req, StreamEvent(req.id, delta, req.row.completion())))

    def _sampler_for(self, rows: list[Request]) -> RowSampler:
        key = tuple(r.id for r in rows)
        if self._sampler is None or self._sampler[0] != key:  # rebuilt only when the batch changes
            params = [r.params for r in rows]
            history = self._token_history() if any(p.adjusts_logits for p in params) else None
            sampler = RowSampler.build(params, self.device, [r.generator for r in rows], history,
                                       [r.slot for r in rows])
            self._sampler = (key, sampler)
        return self._sampler[1]

    def _token_history(self) -> TokenHistory:
        """The history per slot of the requests with penalties or biases, made at first use."""
        if self._history is None:
            vocab = self.decoder.model.config.vocab_size
            self._history = TokenHistory.empty(self.decoder.max_batch, vocab, self.device)
        return self._history

    @staticmethod
    def _logprobs(rows: list[Request], logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob | None]:
        want = [i for i, r in enumerate(rows) if r.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(rows)
        if not want:  # the usual step: nothing to index on the device
            return out
        scored = token_logprobs(logits[want], [tokens[i] for i in want], [rows[i].logprobs for i in want])
        for i, lp in zip(want, scored):
            out[i] = lp
        return out


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


_STASHED_STATE: list = []


def _cuda_graph_state() -> dict:
    """This thread's CUDA-graph trees (the compiled step's recorded graphs), to hand to the engine thread.

    They live in a thread-local that torch copies only into autograd's threads; torch 2.11 asserts that it
    exists in any thread that records a graph (pytorch#123177), and later versions would build the engine
    thread a second tree, without the graphs warm_up() recorded.
    """
    import torch._inductor.cudagraph_trees  # noqa: F401  (creates this thread's state)

    keys = ("tree_manager_containers", "tree_manager_locks")
    return {key: torch._C._get_obj_in_tls(key) for key in keys if torch._C._is_key_in_tls(key)}


class Engine:
    """A Scheduler on a background thread: the server's interface to the model.

    submit() from any thread; events arrive through each request's callback on the engine thread;
    `stream()` turns them into an async iterator and cancels the request if the consumer goes away.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 16,
        context_len: int | None = None,
        prefill_chunk: int = 2048,
        compile: bool | dict | None = None,
        overlap: bool | None = None,
        reuse_prefixes: bool = True,
        lookup: int = 0,
        kv_dtype: torch.dtype | None = None,
    ):
        context_len = context_len or model.config.max_seq_len
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, max_batch, context_len, prefill_chunk, compile, reuse_prefixes=reuse_prefixes,
                               kv_dtype=kv_dtype)
        if tokenizer is not None:
            stop_ids = tokenizer.stop_ids
        else:
            stop_ids = {model.config.eos_id} - {None}
        self.scheduler = Scheduler(self.decoder, context_len, stop_ids, overlap, lookup)
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # submit vs. abort_all
        self._thread: threading.Thread | None = None

    @property
    def context_len(self) -> int:
        return self.scheduler.context_len

    @property
    def max_batch(self) -> int:
        return self.decoder.max_batch

    def stats(self) -> dict:
        s = self.scheduler
        return {"active": len(s.active) + len(s.prefilling), "waiting": len(s.waiting), "unfinished": len(s.unfinished),
                "slots": self.max_batch, "finished": dict(s.finished)}

    # ---- lifecycle ----
    def warm_up(self) -> None:
        """Decode two tiny requests, alone and then together, before serving: the first clients then do
        not wait for the CPU kernels to build or for the GPU's prefill and decode step to compile (for one
        row and for several), a minute or more each. Runs on this thread, before start()."""
        if self._thread is not None:
            raise RuntimeError("warm_up() runs before start()")
        params = SamplingParams(max_new_tokens=3, stop_ids=())
        prompt = [0, 0, 0]  # a length no other size of the first compile shares (it would be one symbol)
        for n in sorted({1, min(2, self.max_batch)}):
            for _ in range(n):
                self.scheduler.submit(prompt, params)
            while self.scheduler.has_work:
                self.scheduler.step()
        self.scheduler.finished.clear()
        self.decoder.held.clear()  # the warm-up's prompts are no client's

    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            state = _cuda_graph_state() if self.decoder.compiled else {}
            self._thread = threading.Thread(target=self._loop, args=(state,), name="codellama-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self, cuda_graph_state: dict) -> None:
        for key, obj in cuda_graph_state.items():  # as autograd's threads get it
            # torch 2.11 drops a reference it never took when this thread ends (the state was freed while
            # the starting thread still used it: a segfault later): hold one more for each thread
            _STASHED_STATE.append(obj)
            torch._C._stash_obj_in_tls(key, obj)
        sched = self.scheduler
        while not self._stop:
            if not sched.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                events = sched.step()
            except Exception:  # a failed step must not kill the engine: fail its requests, keep serving
                log.exception("decode step failed; aborting the running requests")
                with self._lock:
                    events = sched.abort_all("error")
            for req, event in events:
                if req.on_event is not None:
                    try:
                        req.on_event(event)
                    except Exception:
                        log.exception("request %s: event callback failed; cancelling it", req.id)
                        req.cancel()

    # ---- requests ----
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[StreamEvent], None],
        decode: Callable[[list[int]], str] | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        pieces: bool = True,
    ) -> Request:
        with self._lock:
            req = self.scheduler.submit(prompt, params, decode, logprobs, on_event, prompt_logprobs=prompt_logprobs,
                                        pieces=pieces)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        req.cancel()
        self._wake.set()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        decode: Callable[[list[int]], str] | None = None,
    ) -> list[Completion]:
        """Blocking helper: run the prompts through the running engine, return their completions."""
        done = threading.Semaphore(0)
        out: dict[int, Completion] = {}

        def on_event(ev: StreamEvent) -> None:
            if ev.completion is not None:
                out[ev.row] = ev.completion
                done.release()

        reqs = [self.submit(p, params, on_event, decode) for p in prompts]
        for _ in reqs:
            done.acquire()
        return [out[r.id] for r in reqs]

    async def stream(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        decode: Callable[[list[int]], str] | None = None,
        logprobs: int | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Async events of one request, ending with the one that carries its Completion.

        Leaving the iteration early (a client that disconnected) cancels the request and frees its slot.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        req = self.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), decode, logprobs)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.completion is not None:
                    return
        finally:
            if not req.finished:
                self.cancel(req)
