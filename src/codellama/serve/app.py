"""The OpenAI-compatible HTTP API: /v1/completions (with `suffix` infilling), /v1/chat/completions,
/v1/models, /v1/models/{model}, /health, /metrics (Prometheus, serve/metrics.py), /tokenize and /detokenize
(serve/tokenize.py); and llama.cpp's /infill (serve/llamacpp.py) for the editor plugins made for it.
Streaming as server-sent events ending with `data: [DONE]`.

Every request runs as one or more engine requests (one per prompt and choice); a client that disconnects
cancels them, which frees their cache slots at the engine's next step. Errors are answered in OpenAI's
shape and never reach the engine loop; each request logs one JSON line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from codellama.engine.batching import Engine
from codellama.engine.batching import Request as EngineRequest
from codellama.engine.rows import Completion, StreamEvent
from codellama.errors import UserError
from codellama.sampling import SamplingParams
from codellama.serve.metrics import Metrics
from codellama.serve.protocol import ChatRequest, CompletionRequest, OpenAIError
from codellama.serve.tokens import text_offsets, token_bytes, token_text

log = logging.getLogger("codellama.serve")

# a JSON escape of a UTF-16 surrogate: only a body holding one pays for the check that each is paired
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# JSON bytes a request may spend per token of its prompts: token ids take up to 7, text a few (more where
# every character is escaped, like "\u4e2d")
_BODY_BYTES_PER_TOKEN = 32


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None  # None or empty (an empty CODELLAMA_API_KEY): no authentication
    max_concurrent: int = 64  # choices running or queued at once; beyond: 429
    max_tokens: int | None = None  # largest max_tokens a request may ask for (None: the context)
    # `suffix` requests in SPM order (<PRE> <SUF> suffix <MID> prefix): typing at the cursor then changes
    # only the prompt's end, so prefix reuse covers the file around it (PSM changes the middle of the prompt)
    suffix_first: bool = False
    # origins whose web pages may call the API from a browser (CORS; "*": any); none: browsers refuse them
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # clients' tokens are compared stripped, so a key read with a newline (a file, an env file) matched none
        if self.api_key is not None:
            self.api_key = self.api_key.strip() or None


@dataclass
class _Job:
    """One engine request: a prompt's token ids and how to decode the choice."""

    prompt: list[int]
    params: SamplingParams
    decode: Callable[[list[int]], str] | None  # None without a tokenizer
    logprobs: int | None
    prompt_index: int
    prompt_logprobs: bool = False  # echo + logprobs: the prompt's tokens are scored too
    prompt_only: bool = False  # echo + max_tokens 0: the one token generated to score the prompt is dropped


def _cached_tokens(completions: list[Completion | None], jobs: list[_Job]) -> int:
    """Prompt tokens the engine did not prefill again (its slots held them), counted once per prompt (by its
    first choice), as prompt_tokens is."""
    first = {}
    for job, c in zip(jobs, completions):
        first.setdefault(job.prompt_index, c)
    return sum(c.cached_tokens for c in first.values() if c is not None)


class _Mailbox:
    """Events from the engine's thread into the event loop's queues, one wake-up of the loop for the events a
    step hands over together (a call_soon_threadsafe per event woke it once per token and request: at 16
    clients 16 times a step, each time on a core the step's threads wanted)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue, object]] = deque()
        self._signalled = False  # a delivery is scheduled and has not started

    def post(self, queue: asyncio.Queue, item: object) -> None:
        """From any thread: put item into queue on the loop's thread."""
        self._items.append((queue, item))
        if not self._signalled:  # set before the deliverer clears it, or it sees the item: none is left behind
            self._signalled = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self._signalled = False
        while self._items:
            queue, item = self._items.popleft()
            queue.put_nowait(item)


class Server:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = config
        self.created = int(time.time())
        self.metrics = Metrics()
        self._mailbox: _Mailbox | None = None

    # ---- helpers ----
    def _check_auth(self, request: Request) -> None:
        if not self.config.api_key:  # as the banner says "auth off"
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise OpenAIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with the "
                              "key the server was started with", code="invalid_api_key")

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise OpenAIError(404, f"The model {name!r} does not exist; this server serves "
                              f"{self.config.model_name!r} (see /v1/models)", param="model", code="model_not_found")

    def _max_body(self) -> int:
        # room for the most a request may ask: max_concurrent prompts filling the context, at a generous
        # _BODY_BYTES_PER_TOKEN; anything bigger could not run and would hold memory and the event loop
        return max(1 << 20, self.config.max_concurrent * self.engine.context_len * _BODY_BYTES_PER_TOKEN)

    async def _body(self, request: Request) -> bytes:
        """The body, refused as soon as it is known to be too big (before it is all read)."""
        limit = self._max_body()
        declared = request.headers.get("content-length", "")
        raw = bytearray()
        if not (declared.isdigit() and int(declared) > limit):
            try:
                async for part in request.stream():
                    raw += part
                    if len(raw) > limit:
                        break
                else:
                    return bytes(raw)
            except ClientDisconnect:  # nobody hears the answer; said so in the request's log line, no traceback
                raise OpenAIError(400, "The client closed the connection before sending the whole request body",
                                  code="client_disconnected") from None
        raise OpenAIError(413, f"The request body is larger than this server accepts ({limit} bytes: room for "
                          f"{self.config.max_concurrent} prompts of {self.engine.context_len} tokens); send fewer "
                          "or shorter prompts", code="request_too_large")

    async def _parse(self, request: Request, cls):
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise OpenAIError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed",
                              code="unsupported_content_encoding")
        raw = await self._body(request)
        try:
            # decoded strictly: json.loads(bytes) lets surrogates through ("surrogatepass"), as UTF-8 bytes (ED A0
            # 80) or as escapes in a UTF-16 or UTF-32 body, where a search of the bytes for "\\ud800" missed them
            text = raw.decode(json.detect_encoding(raw))
            data = json.loads(text)
            if _SURROGATE_ESCAPE.search(text):  # a lone one ("\ud800") would break the tokenizer; pairs are fine
                json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise OpenAIError(400, "The request body holds a lone UTF-16 surrogate escape (like \\ud800), which "
                              "is not text", code="invalid_json") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and a number of more than 4300 digits
            raise OpenAIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise OpenAIError(400, "The request body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "The request body must be a JSON object", code="invalid_json")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            field, message = _explain(e)
            raise OpenAIError(400, message, param=field) from None

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise OpenAIError(400, f"{what} needs a tokenizer and this model was loaded without one; "
                              "send the prompt as a list of token ids")
        return self.tokenizer

    def _max_new(self, requested: int | None, prompt_len: int, param: str, prompt_param: str = "prompt") -> int:
        ctx = self.engine.context_len
        if prompt_len >= ctx:
            raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                              f"{prompt_len} tokens. Shorten the prompt.", param=prompt_param,
                              code="context_length_exceeded")
        limit = self.config.max_tokens or ctx
        if requested is None or requested == -1:  # -1: llama.cpp's "no limit" (llama.vscode's chats send it)
            return min(limit, ctx - prompt_len)
        if requested < 1:
            raise OpenAIError(400, f"{param} must be at least 1, got {requested}", param=param)
        if requested > limit:
            raise OpenAIError(400, f"{param} is {requested}, more than this server allows ({limit})", param=param)
        if prompt_len + requested > ctx:
            raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens, but you requested "
                              f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                              f"completion). Shorten the prompt or lower {param}.", param=param,
                              code="context_length_exceeded")
        return requested

    def _check_generations(self, n: int) -> None:
        limit = self.config.max_concurrent
        if n > limit:  # a 429 would be retried (the openai client does) and never succeed
            raise OpenAIError(400, f"This request asks for {n} generations (prompts x n), more than the {limit} "
                              "this server runs at once; send fewer prompts or a smaller n", param="n")

    def _check_capacity(self, n: int) -> None:
        self._check_generations(n)
        limit = self.config.max_concurrent
        # counts the engine's own requests (running + queued), so nothing can leak when a client vanishes
        if self.engine.stats()["unfinished"] + n > limit:
            raise OpenAIError(429, f"The server is at its limit of {limit} concurrent "
                              "generations; retry shortly", type="rate_limit_error", code="rate_limit_exceeded")

    async def _run(self, jobs: list[_Job], request: Request, handles: list | None = None,
                   pieces: bool = True) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Run the jobs in the engine; yield (job index, event). Leaving early cancels what still runs.
        `handles` receives the engine's requests (to cancel one and still hear its completion). pieces=False:
        only each job's first event (its time to first token) and the one with its Completion."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        post = self._mailbox.post
        queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()
        reqs = [] if handles is None else handles
        started = [False] * len(jobs)
        try:
            for i, job in enumerate(jobs):
                def on_event(ev: StreamEvent, i: int = i) -> None:
                    if pieces or ev.completion is not None or not started[i]:
                        started[i] = True
                        post(queue, (i, ev))

                reqs.append(self.engine.submit(job.prompt, job.params, on_event, job.decode, job.logprobs,
                                               job.prompt_logprobs, pieces))
            remaining, next_check = len(jobs), loop.time() + 1.0
            while remaining:
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    ev = None
                # every second, however fast the tokens come: a request answered in one piece hears of its
                # client leaving only here, and would otherwise hold its slot to max_tokens
                if loop.time() >= next_check:
                    if await request.is_disconnected():
                        return
                    next_check = loop.time() + 1.0
                if ev is None:
                    continue
                if jobs[i].prompt_only:
                    ev = _without_generated(ev)
                if ev.completion is not None:
                    remaining -= 1
                yield i, ev
        finally:
            for r in reqs:
                if not r.finished:
                    self.engine.cancel(r)

    def _log(self, kind: str, rid: str, start: float, first: float | None, prompt_tokens: int,
             completions: list[Completion | None], jobs: list[_Job], stream: bool, status: str,
             reqs: list[EngineRequest]) -> None:
        done = [c for c in completions if c is not None]
        latency = time.perf_counter() - start
        # a request its client left counts the tokens it generated before (streamed ones were sent)
        n_out = sum(len(c.tokens) if c is not None else len(r.row.tokens) for c, r in zip(completions, reqs))
        cached, reasons = _cached_tokens(completions, jobs), [c.finish_reason for c in done]
        ttft = None if first is None else first - start
        self.metrics.request(kind, status, prompt_tokens, cached, n_out, latency, ttft, reasons)
        log.info(json.dumps({
            "event": "request", "id": rid, "endpoint": kind, "stream": stream, "status": status,
            "prompt_tokens": prompt_tokens, "cached_tokens": cached, "completion_tokens": n_out,
            "latency_s": round(latency, 4), "ttft_s": None if ttft is None else round(ttft, 4),
            "tokens_per_s": round(n_out / latency, 2) if latency > 0 else None, "finish_reasons": reasons,
        }))

    # ---- building the jobs ----
    def _completion_jobs(self, body: CompletionRequest) -> tuple[list[_Job], list[str], int]:
        jobs, prompt_texts, prompt_tokens = [], [], 0
        prompts = body.prompts()
        # before any prompt is tokenized: 8 MB of short prompts (1.6M) held the event loop for 24 s to be refused
        self._check_generations(len(prompts) * body.n)
        for pi, prompt in enumerate(prompts):
            # a continuation keeps the leading space of its first piece ("x =" -> " 1"), as editors expect
            decode = None if self.tokenizer is None else self.tokenizer.decode_infilling
            if isinstance(prompt, str):
                tok = self._require_tokenizer("A text prompt")
                if body.suffix is not None:
                    from codellama.prompts import infill_tokens

                    try:
                        ids = infill_tokens(tok, prompt, body.suffix, suffix_first=self.config.suffix_first)
                    except UserError as e:  # the model cannot infill
                        raise OpenAIError(400, str(e), param="suffix") from None
                else:
                    ids = tok.encode(prompt, bos=tok.add_bos)
                prompt_texts.append(prompt)
            else:
                if body.suffix is not None:
                    raise OpenAIError(400, "`suffix` needs a text prompt", param="suffix")
                if not all(isinstance(t, int) for t in prompt):
                    raise OpenAIError(400, "token ids in the prompt must be integers", param="prompt")
                ids = list(prompt)
                prompt_texts.append(decode(ids) if decode else "")
            if not ids:
                raise OpenAIError(400, f"prompt {pi} is empty", param="prompt")
            self._check_vocab(ids, "prompt")
            stop_ids = self._infill_stop_ids(ids)
            # OpenAI's way to score a prompt (lm-evaluation-harness 0.3, HELM): echo it, generate nothing
            prompt_only = body.echo and body.max_tokens == 0
            requested = 1 if prompt_only else body.max_tokens
            if "max_tokens" not in body.model_fields_set and self.config.max_tokens:
                requested = min(requested, self.config.max_tokens)  # OpenAI's default, within this server's limit
            max_new = self._max_new(requested, len(ids), "max_tokens")
            prompt_tokens += len(ids)
            for j in range(body.n):
                jobs.append(_Job(ids, body.sampling(max_new, j, self._vocab_size, stop_ids), decode, body.logprobs, pi,
                                 body.echo and body.logprobs is not None, prompt_only))
        return jobs, prompt_texts, prompt_tokens

    def _infill_stop_ids(self, ids: list[int]) -> tuple[int, ...] | None:
        """An infilling prompt (one holding ▁<MID>: built from `suffix`, or by an editor in Code Llama's format
        "<PRE> {prefix} <SUF>{suffix} <MID>", as Continue does) ends at ▁<EOT>, which decoding drops, so a stop
        string "<EOT>" could never match. None: the engine's stop ids."""
        tok = self.tokenizer
        if tok is None or tok.middle_id is None or tok.eot_id is None or tok.middle_id not in ids:
            return None
        return tuple(set(tok.stop_ids) | {tok.eot_id})

    def _chat_jobs(self, body: ChatRequest) -> tuple[list[_Job], int]:
        tok = self._require_tokenizer("Chat")
        from codellama.prompts import chat_tokens

        try:
            ids = chat_tokens(tok, body.message_dicts())
        except UserError as e:  # the prompt format refuses the conversation (roles out of turn, say)
            raise OpenAIError(400, str(e), param="messages") from None
        self._check_vocab(ids, "messages")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = self._max_new(requested, len(ids), param, "messages")
        lp = (body.top_logprobs or 0) if body.logprobs else None
        jobs = [_Job(ids, body.sampling(max_new, j, self._vocab_size), tok.decode, lp, 0) for j in range(body.n)]
        return jobs, len(ids)

    @property
    def _vocab_size(self) -> int:
        """The model's vocabulary: the token ids it has embeddings and logits for."""
        return self.engine.decoder.model.config.vocab_size

    def _check_vocab(self, ids: list[int], param: str) -> None:
        # token ids given, or a tokenizer with pieces past the model's embedding (a Python / 34B checkpoint
        # beside a tokenizer that has the infill pieces): the model cannot read them
        vocab = self._vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise OpenAIError(400, f"the {param} holds token ids outside this model's vocabulary of {vocab} (its "
                              "tokenizer has pieces the model has no embedding for)", param=param)

    # ---- response pieces ----
    def _completion_logprobs(self, c: Completion, prompt: list[int], echo: str) -> dict | None:
        """OpenAI's logprobs object; with echo the prompt's tokens come first (the first one unscored), then
        the generated ones. text_offset: where each token's text starts in the choice's text (echo + c.text)."""
        if c.logprobs is None and c.prompt_logprobs is None:
            return None
        scored = list(zip(prompt, c.prompt_logprobs or ()))
        generated = [(lp.token, lp) for lp in c.logprobs or ()]
        tok = self.tokenizer
        offsets = (text_offsets([token_bytes(tok, t) for t, _ in scored], echo)
                   + text_offsets([token_bytes(tok, t) for t, _ in generated], c.text, len(echo)))
        tokens = scored + generated
        return {
            "tokens": [token_text(tok, t) for t, _ in tokens],
            "token_logprobs": [None if lp is None else lp.logprob for _, lp in tokens],
            "top_logprobs": [None if lp is None else {token_text(tok, t): v for t, v in lp.top.items()}
                             for _, lp in tokens],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, c: Completion) -> dict | None:
        if c.logprobs is None:
            return None

        def entry(token: int, value: float) -> dict:
            # the token's own bytes: a token holding part of a character is not U+FFFD's three bytes
            return {"token": token_text(self.tokenizer, token), "logprob": value,
                    "bytes": list(token_bytes(self.tokenizer, token))}

        return {"content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
            for lp in c.logprobs
        ]}

    @staticmethod
    def _usage(prompt_tokens: int, completions: list[Completion | None], jobs: list[_Job]) -> dict:
        n_out = sum(len(c.tokens) for c in completions if c is not None)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": n_out, "total_tokens": prompt_tokens + n_out,
                "prompt_tokens_details": {"cached_tokens": _cached_tokens(completions, jobs)}}

    # ---- endpoints ----
    async def completions(self, request: Request):
        self._check_auth(request)
        body = await self._parse(request, CompletionRequest)
        self._check_model(body.model)
        jobs, prompt_texts, prompt_tokens = self._completion_jobs(body)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = [prompt_texts[j.prompt_index] if body.echo else "" for j in jobs]

        def chunk(i: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.config.model_name,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

        def final(completions: list[Completion]) -> dict:
            choices = [{"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason,
                        "logprobs": self._completion_logprobs(c, jobs[i].prompt, echo[i])}
                       for i, c in enumerate(completions)]
            return {"id": rid, "object": "text_completion", "created": created, "model": self.config.model_name,
                    "choices": choices, "usage": self._usage(prompt_tokens, completions, jobs)}

        return await self._respond("completions", rid, request, body, jobs, prompt_tokens, chunk, final, echo)

    async def chat(self, request: Request):
        self._check_auth(request)
        body = await self._parse(request, ChatRequest)
        self._check_model(body.model)
        jobs, prompt_tokens = self._chat_jobs(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(i: int, text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else ({"role": "assistant", "content": ""} if text == "" else {"content": text})
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.config.model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final(completions: list[Completion]) -> dict:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                        "logprobs": self._chat_logprobs(c), "finish_reason": c.finish_reason}
                       for i, c in enumerate(completions)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.config.model_name,
                    "choices": choices, "usage": self._usage(prompt_tokens, completions, jobs)}

        return await self._respond("chat", rid, request, body, jobs, prompt_tokens, chunk, final, None)

    async def _respond(
        self,
        kind: str,
        rid: str,
        request: Request,
        body: CompletionRequest | ChatRequest,
        jobs: list[_Job],
        prompt_tokens: int,
        chunk: Callable[[int, str | None, str | None], dict],
        final: Callable[[list[Completion]], dict],
        echo: list[str] | None,
    ) -> JSONResponse | StreamingResponse:
        """Run the jobs and answer with one JSON body (`final`) or, for a stream, one event per piece of text
        (`chunk(choice, text, finish_reason)`). `echo`: each completion choice's echoed prompt ("" without
        echo); None for a chat, whose stream opens each choice with the assistant's role."""
        self._check_capacity(len(jobs))
        start, first = time.perf_counter(), None
        completions: list[Completion | None] = [None] * len(jobs)
        reqs: list[EngineRequest] = []  # the engine's requests, as _run submits them
        if not body.stream:
            status = "disconnected"
            try:
                async for i, ev in self._run(jobs, request, reqs, pieces=False):
                    first = first or time.perf_counter()
                    if ev.completion is not None:
                        completions[i] = ev.completion
                status = "ok" if all(c is not None for c in completions) else "disconnected"
                if any(c is not None and c.finish_reason == "error" for c in completions):
                    status = "error"
                    raise OpenAIError(500, "generation failed inside the engine; see the server log",
                                      type="server_error", code="engine_error")
                if status == "disconnected":
                    return JSONResponse({}, status_code=499)
                return JSONResponse(final(completions))
            finally:
                self._log(kind, rid, start, first, prompt_tokens, completions, jobs, False, status, reqs)

        def piece(i: int, text: str | None, finish: str | None) -> str:
            obj = chunk(i, text, finish)
            if body.include_usage():
                obj["usage"] = None  # as OpenAI does: only the last chunk, with no choices, carries usage
            return _sse(obj)

        async def sse() -> AsyncIterator[str]:
            nonlocal first
            status = "disconnected"
            try:
                for i in range(len(jobs)):  # a chat stream opens each choice with its role; echo sends the prompt
                    if echo is None:
                        yield piece(i, "", None)
                    elif echo[i]:
                        yield piece(i, echo[i], None)
                async for i, ev in self._run(jobs, request, reqs):
                    first = first or time.perf_counter()
                    if ev.text:
                        yield piece(i, ev.text, None)
                    if ev.completion is not None:
                        completions[i] = ev.completion
                        if ev.completion.finish_reason == "error":
                            yield _sse(OpenAIError(500, "generation failed inside the engine", type="server_error",
                                                   code="engine_error").body())
                        else:
                            yield piece(i, None if echo is None else "", ev.completion.finish_reason)
                if body.include_usage():
                    usage = chunk(0, None, None)
                    usage["choices"], usage["usage"] = [], self._usage(prompt_tokens, completions, jobs)
                    yield _sse(usage)
                yield "data: [DONE]\n\n"
                status = "ok"
            finally:
                self._log(kind, rid, start, first, prompt_tokens, completions, jobs, True, status, reqs)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "codellama"}

    async def models(self, request: Request):
        self._check_auth(request)
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, request: Request, model: str):
        self._check_auth(request)
        self._check_model(model)
        return self._model_card()

    async def infill(self, request: Request):
        """llama.cpp's /infill (serve/llamacpp.py), for llama.vscode and llama.vim."""
        from codellama.serve.llamacpp import infill

        return await infill(self, request)

    async def tokenize(self, request: Request):
        """llama.cpp's and vLLM's /tokenize (serve/tokenize.py)."""
        from codellama.serve.tokenize import tokenize

        return await tokenize(self, request)

    async def detokenize(self, request: Request):
        from codellama.serve.tokenize import detokenize

        return await detokenize(self, request)

    async def health(self, request: Request):
        return {"status": "ok", "model": self.config.model_name, **self.engine.stats()}

    async def prometheus(self, request: Request):
        """Counters for a Prometheus scraper (serve/metrics.py); no auth, as /health and vLLM's /metrics."""
        return PlainTextResponse(self.metrics.render(self.engine.stats()), media_type="text/plain; version=0.0.4")


def _union_member(part: object) -> bool:
    # pydantic reports a value that fits no member of a union once per member, named like 'str' or 'list[int]'
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _explain(e: ValidationError) -> tuple[str | None, str]:
    """(param, message) for the first problem of a request body, in words a client's user can act on."""

    def place(loc: tuple) -> tuple:  # where the problem is: the loc up to a union member's name
        return loc[: next((k for k, part in enumerate(loc) if _union_member(part)), len(loc))]

    errors = e.errors()
    first, head = errors[0], place(errors[0]["loc"])
    field = ".".join(str(x) for x in head) or None
    if len(head) < len(first["loc"]):  # one error per union member: name the accepted shapes once
        members = [str(err["loc"][len(head)]) for err in errors if place(err["loc"]) == head]
        problem = "expected " + " or ".join(dict.fromkeys(members))
    else:
        problem = first["msg"].removeprefix("Value error, ")
    # the field itself missing, not an item inside one of its union's members (a [token, bias] pair without a bias)
    missing = first["type"] == "missing" and len(head) == len(first["loc"])
    message = f"{field!r} is required" if missing else f"Invalid value for {field!r}: {problem}"
    others = len({place(err["loc"]) for err in errors}) - 1
    return field, message + (f" (and {others} more)" if others else "")


def _without_generated(ev: StreamEvent) -> StreamEvent:
    """The event as if nothing was generated (max_tokens 0): no text, and a completion of no tokens."""
    c = ev.completion
    if c is not None and c.finish_reason in ("stop", "length"):
        c = replace(c, tokens=[], text="", finish_reason="length", logprobs=None if c.logprobs is None else [])
    return replace(ev, text="", completion=c)


# what JSON leaves raw but str.splitlines() ends a line at (httpx's iter_lines, requests' with decode_unicode):
# escaped, an event is one line for those readers too
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `engine` (which the caller starts and closes)."""
    server = Server(engine, config)
    app = FastAPI(title="codellama", version="0.1.0")
    app.state.server = server

    def route(path: str, endpoint, methods: list[str]) -> None:
        # "/v1/completions/" is served in place, not with Starlette's 307 redirect: curl without -L gets an
        # empty answer, and behind a TLS proxy the redirect points at http://, where clients drop the API key
        app.add_api_route(path, endpoint, methods=methods)
        app.add_api_route(path + "/", endpoint, methods=methods, include_in_schema=False)

    route("/v1/completions", server.completions, ["POST"])
    route("/v1/chat/completions", server.chat, ["POST"])
    # HEAD too, as for any GET resource (uptime probes send it); uvicorn answers it without the body
    route("/v1/models", server.models, ["GET", "HEAD"])  # before the next route, which would read "/" as model ""
    app.add_api_route("/v1/models/{model:path}", server.model, methods=["GET", "HEAD"])  # names may hold a '/'
    route("/health", server.health, ["GET", "HEAD"])
    route("/infill", server.infill, ["POST"])  # llama.cpp's
    route("/metrics", server.prometheus, ["GET", "HEAD"])
    route("/tokenize", server.tokenize, ["POST"])
    route("/detokenize", server.detokenize, ["POST"])

    def answer(request: Request, exc: OpenAIError, headers: dict | None = None) -> JSONResponse:
        """The error's answer. A refusal (4xx: nothing ran) gets its request log line here, as a request that
        ran gets one when it ends (was none: a client refused again and again left no trace in the log); a 500
        is logged where it happened."""
        server.metrics.error(exc.status)
        if exc.status < 500:
            log.info(json.dumps({"event": "request", "path": request.url.path, "status": "refused",
                                 "http_status": exc.status, "code": exc.code, "param": exc.param,
                                 "message": exc.message[:300]}, ensure_ascii=False))
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return answer(request, exc)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return answer(request, OpenAIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "unknown_url" if exc.status_code == 404 else None  # what OpenAI answers to an unknown URL
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return answer(request, OpenAIError(exc.status_code, message, code=code), exc.headers)  # a 405's Allow

    app.add_middleware(_InternalErrors, on_error=server.metrics.error)
    if config.cors_origins:  # outermost: a 500 and a 401 carry the headers too, so a page can read them
        # any request header: the openai package sends its own (x-stainless-os & co.); Starlette names the
        # ones asked for, which covers Authorization (a bare "*" would not)
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "HEAD", "POST"], allow_headers=["*"], max_age=3600)
    return app


class _InternalErrors:
    """A bug answered as a 500 in OpenAI's shape. Not an exception handler for Exception: Starlette runs that
    one outermost and raises the error again after answering, so uvicorn drops the client's connection."""

    def __init__(self, app, on_error: Callable[[int], None]):
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if scope["type"] != "http" or started:  # a stream already under way cannot become a 500
                raise
            log.exception("unhandled error serving %s", scope.get("path"))
            self.on_error(500)
            body = OpenAIError(500, f"internal server error: {type(exc).__name__}", type="server_error").body()
            await JSONResponse(body, status_code=500)(scope, receive, send)
