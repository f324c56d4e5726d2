"""llama.cpp server's `POST /infill`, the endpoint llama.vscode and llama.vim complete code with.

The body carries the code around the cursor apart: `input_prefix` (the lines before the cursor's line),
`prompt` (the cursor's line up to the cursor), `input_suffix` (the rest), `input_extra` (snippets of other
files, as {"filename", "text"}). We lay them out in the model's infilling format with the snippets and the
cursor's line around the prefix, as llama.cpp does for a model without repository-level tokens, and cut an
input longer than the context as llama.cpp does: the prefix (snippets first) from its start and the suffix
from its end, the suffix keeping at most a quarter of the room. `n_indent` and `t_max_predict_ms` end the
generation as llama.cpp's do; the answer has llama.cpp's fields (content, stop_type, timings, ...).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from codellama.errors import UserError
from codellama.prompts import CANNOT_INFILL, infill_layout
from codellama.sampling import BIAS_LIMIT
from codellama.serve.protocol import OpenAIError, RequestBody

if TYPE_CHECKING:
    from fastapi import Request

    from codellama.engine.rows import Completion
    from codellama.serve.app import Server
    from codellama.tokenizer import Tokenizer

# llama.cpp's separator of input_extra's snippets for a model without a file-separator token
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"
# llama.cpp's two forms of logit_bias: [[token id, bias], ...] (false: never) or {"token id": bias}; a JSON
# list is read as the pair (strict mode takes only tuples), its members still strictly
LogitBias = list[Annotated[tuple[int, float | Literal[False]], Field(strict=False)]] | dict[str, float]


class Snippet(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    text: str = ""
    filename: str = "tmp"  # llama.cpp's default; read only by models with file-separator tokens


class InfillRequest(RequestBody):
    """llama.cpp's /infill body; the sampling defaults are llama.cpp server's."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[Snippet] = []
    prompt: str = ""
    n_predict: Annotated[int, Field(ge=-1)] = -1  # -1: up to the server's limit; 0: prefill only (warms the cache)
    temperature: Annotated[float, Field(ge=0)] = 0.8
    top_k: Annotated[int, Field(ge=-1, lt=2**63)] = 40  # 0 or -1: off
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.05
    seed: Annotated[int, Field(ge=-1, lt=2**64)] = -1  # -1: random
    stop: list[str] = []
    stream: bool = False
    n_indent: Annotated[int, Field(ge=0)] = 0
    t_max_predict_ms: Annotated[int, Field(ge=0)] = 0
    logit_bias: LogitBias | None = None
    response_fields: list[str] | None = None
    model: str | None = None

    def token_biases(self) -> dict[int, float]:
        if isinstance(self.logit_bias, dict):
            pairs = list(self.logit_bias.items())
            if not all(k.isascii() and k.isdigit() for k, _ in pairs):
                raise OpenAIError(400, "logit_bias keys must be token ids written as strings (like \"13\")",
                                  param="logit_bias")
        else:
            pairs = self.logit_bias or []
        # false bans the token: the sampler's most negative bias
        return {int(t): -BIAS_LIMIT if b is False else b for t, b in pairs}


def infill_ids(tok: Tokenizer, body: InfillRequest, room: int, suffix_first: bool) -> tuple[list[int], bool]:
    """The prompt's ids and whether the prefix or suffix was cut to fit `room` tokens."""
    if not tok.can_infill:
        raise OpenAIError(400, CANNOT_INFILL, param="input_suffix")
    snippets = "".join(SNIPPET_SEPARATOR + s.text for s in body.input_extra)
    prefix = tok.encode(snippets + body.input_prefix + body.prompt)
    suffix = tok.encode_infilling(body.input_suffix)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    budget = room - len(bos) - 3  # <PRE> <SUF> <MID>
    if budget < 1:
        raise OpenAIError(400, f"n_predict {body.n_predict} leaves no room for the prompt in the context; ask for "
                          "fewer tokens", param="n_predict")
    suffix_take = min(len(suffix), max(budget // 4, budget - len(prefix)))
    prefix_take = min(len(prefix), budget - suffix_take)
    truncated = prefix_take < len(prefix) or suffix_take < len(suffix)
    return infill_layout(tok, prefix[len(prefix) - prefix_take:], suffix[:suffix_take], suffix_first), truncated


def indent_cut(text: str, n_indent: int) -> int | None:
    """Where llama.cpp's n_indent ends `text`: after the indentation of the first line, past the first, that
    starts less indented than n_indent (None: no such line yet). A line counts once a character follows its
    indentation, so the cut is known only then."""
    start = text.find("\n") + 1
    while n_indent > 0 and start > 0:
        end = start
        while end < len(text) and text[end] in " \t":
            end += 1
        if end == len(text):
            return None
        if end - start < n_indent:
            return end
        start = text.find("\n", start) + 1
    return None


class Release:
    """The text a stream may send: with n_indent, a line's text waits until its indentation is known."""

    def __init__(self, n_indent: int):
        self.n_indent, self.text, self.sent = n_indent, "", 0
        self.cut = False

    def add(self, delta: str) -> str:
        self.text += delta
        at = indent_cut(self.text, self.n_indent)
        if at is not None:
            self.text, self.cut = self.text[:at], True
        end = len(self.text)
        if not self.cut and self.n_indent > 0 and "\n" in self.text:
            line = self.text.rfind("\n") + 1
            if not self.text[line:].strip(" \t"):
                end = line  # its indentation may still end it
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def flush(self) -> str:
        """What was held back, once the text is final."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def stop_type(c: Completion, tok: Tokenizer, stops: list[str], limited: bool) -> tuple[str, str]:
    """llama.cpp's (stop_type, stopping_word) of a completion."""
    if limited or c.finish_reason in ("length", "cancelled"):
        return "limit", ""
    whole = tok.decode_infilling(c.tokens)
    word = next((s for s in stops if whole[len(c.text):].startswith(s)), None) if whole != c.text else None
    return ("word", word) if word is not None else ("eos", "")


def timings(prompt_n: int, start: float, first: float | None, end: float, predicted_n: int) -> dict:
    """llama.cpp's timings, measured at the server: the prompt's time is the time to the first token."""
    first = first or end
    prompt_ms, predicted_ms = (first - start) * 1e3, (end - first) * 1e3

    def rates(n: int, ms: float) -> tuple[float | None, float | None]:
        return (ms / n if n else None), (n / ms * 1e3 if ms > 0 else None)

    p_tok, p_rate = rates(prompt_n, prompt_ms)
    g_tok, g_rate = rates(predicted_n, predicted_ms)
    return {"prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": p_tok, "prompt_per_second": p_rate,
            "predicted_n": predicted_n, "predicted_ms": predicted_ms, "predicted_per_token_ms": g_tok,
            "predicted_per_second": g_rate}


def only_fields(answer: dict, fields: list[str] | None) -> dict:
    """llama.cpp's response_fields: the answer's values at these paths ("timings/prompt_n"), keyed by path."""
    if not fields:
        return answer
    out = {}
    for path in fields:
        value, found = answer, True
        for key in path.split("/"):
            found = found and isinstance(value, dict) and key in value
            value = value.get(key) if found else None
        if found:
            out[path] = value
    return out


async def infill(server: Server, request: Request):
    """POST /infill: one completion, answered whole or streamed as llama.cpp's server-sent events."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from codellama.sampling import SamplingParams
    from codellama.serve.app import _Job, _sse

    server._check_auth(request)
    body = await server._parse(request, InfillRequest)
    server._check_model(body.model)
    tok = server._require_tokenizer("Infilling")
    context = server.engine.context_len
    limit = min(server.config.max_tokens or context, context - 1)
    if body.n_predict > limit:
        raise OpenAIError(400, f"n_predict is {body.n_predict}, more than this server allows ({limit})",
                          param="n_predict")
    reserve = body.n_predict if body.n_predict >= 0 else min(limit, context // 4)
    ids, truncated = infill_ids(tok, body, context - max(reserve, 1), server.config.suffix_first)
    server._check_vocab(ids, "prompt")
    prompt_only = body.n_predict == 0
    max_new = server._max_new(1 if prompt_only else None if body.n_predict < 0 else body.n_predict, len(ids),
                              "n_predict")
    try:
        params = SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                                top_k=max(body.top_k, 0), min_p=body.min_p, stop=tuple(body.stop),
                                stop_ids=server._infill_stop_ids(ids), seed=None if body.seed < 0 else body.seed,
                                logit_bias=body.token_biases())
        params.check_vocab(server._vocab_size)
    except UserError as e:
        raise OpenAIError(400, str(e)) from None
    job = _Job(ids, params, tok.decode_infilling, None, 0, prompt_only=prompt_only)
    server._check_capacity(1)
    start, first = time.perf_counter(), None
    rid = f"infill-{uuid.uuid4().hex[:24]}"
    release = Release(body.n_indent)
    handles: list = []  # the engine's request, to end it early

    def answer(c: Completion, limited: bool) -> dict:
        kind, word = stop_type(c, tok, body.stop, limited or release.cut)
        content = release.text
        return {"index": 0, "content": content, "tokens": [], "id_slot": -1, "stop": True,
                "model": server.config.model_name, "tokens_predicted": len(c.tokens), "tokens_evaluated": len(ids),
                "generation_settings": {"n_predict": body.n_predict, "temperature": body.temperature,
                                        "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
                                        "seed": body.seed, "n_indent": body.n_indent, "stop": body.stop},
                "has_new_line": "\n" in content, "truncated": truncated, "stop_type": kind, "stopping_word": word,
                "tokens_cached": c.cached_tokens,
                "timings": timings(len(ids), start, first, time.perf_counter(), len(c.tokens))}

    async def events() -> AsyncIterator[tuple[str, Completion | None, bool]]:
        """(text a stream may send, the completion at the end, whether t_max_predict_ms ended it)."""
        nonlocal first
        limited = False
        async for _, ev in server._run([job], request, handles):
            first = first or time.perf_counter()
            if ev.completion is not None:
                if ev.completion.finish_reason == "error":
                    raise OpenAIError(500, "generation failed inside the engine; see the server log",
                                      type="server_error", code="engine_error")
                text = "" if limited or release.cut else release.add(ev.text)
                yield text + release.flush(), ev.completion, limited
                return
            if limited or release.cut:
                continue  # ended here: the engine's last word still comes, with the count of what it generated
            text = release.add(ev.text)
            late = body.t_max_predict_ms and (time.perf_counter() - first) * 1e3 > body.t_max_predict_ms
            limited = bool(late and "\n" in release.text)
            if limited or release.cut:
                server.engine.cancel(handles[0])
            yield text, None, False

    def log(c: Completion | None, stream: bool, status: str) -> None:
        server._log("infill", rid, start, first, len(ids), [c], [job], stream, status, handles)

    if not body.stream:
        completion, status = None, "disconnected"
        try:
            async for _, c, limited in events():
                if c is not None:
                    completion, status = c, "ok"
                    return JSONResponse(only_fields(answer(c, limited), body.response_fields))
            return JSONResponse({}, status_code=499)
        except OpenAIError:
            status = "error"
            raise
        finally:
            log(completion, False, status)

    async def sse() -> AsyncIterator[str]:
        completion, status = None, "disconnected"
        try:
            async for text, c, limited in events():
                if text:
                    yield _sse({"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": -1})
                if c is not None:
                    completion, status = c, "ok"
                    yield _sse(only_fields({**answer(c, limited), "content": ""}, body.response_fields))
        except OpenAIError as e:
            status = "error"
            yield _sse(e.body())
        finally:
            log(completion, True, status)

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
