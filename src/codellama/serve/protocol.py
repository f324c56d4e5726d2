"""Request bodies of the OpenAI API subset we serve, validated strictly (a wrong type is a 400).

Fields OpenAI defines that we cannot honour are rejected with a clear message. presence_penalty,
frequency_penalty and logit_bias are applied by the sampler (sampling.py); logit_bias's keys arrive as strings
of token ids, as JSON's object keys must be.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from codellama.errors import UserError
from codellama.sampling import BIAS_LIMIT, PENALTY_LIMIT, REPETITION_LIMIT, SamplingParams

Stop = str | list[str] | None
# OpenAI allows 4; lm-evaluation-harness's local-completions sends a task's stop strings and the EOS text
# uncut (humaneval: 6), as vLLM, which has no limit, takes them
MAX_STOPS = 32
# other servers' extensions that shape the output: ignored, they would leave a client relying on them with
# output that does not follow them, so they are refused by name, unless they hold the value that changes
# nothing (what llama.vscode sends beside its chat requests: typical_p 1, repeat_penalty 1, ...)
_CONSTRAINED = ("constrained decoding", (None, "", {}, []))
UNSUPPORTED_EXTENSIONS: dict[str, tuple[str, tuple]] = {
    **dict.fromkeys(("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                     "grammar", "json_schema"), _CONSTRAINED),
    "typical_p": ("a sampling setting", (None, 1)),
    "mirostat": ("a sampling setting", (None, 0)),
    "min_tokens": ("a sampling setting", (None, 0)),
    "bad_words": ("a sampling setting", (None, [])),
    "use_beam_search": ("a sampling setting", (None, False)),
    "repeat_penalty": ("llama.cpp's penalty over the last tokens; repetition_penalty is served", (None, 1)),
    "dry_multiplier": ("a sampling setting", (None, 0)),
    "xtc_probability": ("a sampling setting", (None, 0)),
    "dynatemp_range": ("a sampling setting", (None, 0)),
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # vLLM's continuous_usage_stats & co.: not applied

    include_usage: bool | None = None


def _is_one_of(value: Any, values: tuple) -> bool:
    """value equals one of values, a bool only a bool (1 == True in Python, not in JSON)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in values)


def _accepts_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


class RequestBody(BaseModel):
    """What every request body shares: strict types, nulls read as defaults, other servers' output-shaping
    extensions refused by name."""

    # NaN and Infinity (which Python's json reads) are no settings: "Input should be a finite number"
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI reads `"temperature": null` (what the openai client sends for temperature=None) as "the
        # default"; drop such nulls for fields that cannot hold None, rather than failing them as wrong types
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                or _accepts_none(cls.model_fields[k].annotation)}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported_extensions(cls, data: Any) -> Any:
        for name in data if isinstance(data, dict) else ():
            what, neutral = UNSUPPORTED_EXTENSIONS.get(name, ("", ()))
            if what and not _is_one_of(data[name], neutral):
                raise OpenAIError(400, f"{name} ({what}, an extension of other servers) is not supported by this "
                                  f"server; the output would not follow {data[name]!r:.40}", param=name)
        return data


class _Common(RequestBody):
    model: str | None = None
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    # an extension (vLLM, llama.cpp server): 0 = off, and vLLM's -1; the sampler holds it in an int64
    top_k: Annotated[int, Field(ge=-1, lt=2**63)] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0  # an extension (vLLM, llama.cpp server)
    # an extension (vLLM): transformers' penalty over the prompt's and the generated tokens; 1: off
    repetition_penalty: Annotated[float, Field(gt=0, le=REPETITION_LIMIT)] = 1.0
    ignore_eos: bool = False  # an extension (vLLM): run to max_tokens, for benchmarks
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: Stop = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # OpenAI's seeds are int64
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)] = 0.0  # OpenAI's range
    frequency_penalty: Annotated[float, Field(ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)] = 0.0
    # token id (a string: JSON's keys are) -> bias added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-BIAS_LIMIT, le=BIAS_LIMIT)]] | None = None
    user: str | None = None  # accepted and ignored (an end user's id, for OpenAI's abuse monitoring)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Common:
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM answer
            raise OpenAIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not (key.isascii() and key.isdigit()):  # int() would also take " 5", "+5", "5_0" and "٥"
                raise ValueError(f"keys must be token ids, integers >= 0 written as strings (like \"50256\"), "
                                 f"got {key!r}")
        return v

    def token_biases(self) -> dict[int, float]:
        return {int(k): b for k, b in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Stop) -> Stop:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _refuse_streamed_logprobs(self, wanted: bool) -> None:
        # the engine streams text, not per-token logprobs: fail loudly rather than drop them
        if wanted and self.stream:
            raise OpenAIError(400, "logprobs are not available in streams; send stream: false", param="logprobs")

    def sampling(self, max_new: int, choice: int, vocab_size: int,
                 stop_ids: tuple[int, ...] | None = None) -> SamplingParams:
        """Settings of one choice; with a seed, choice j draws from seed + j so n > 1 choices differ."""
        seed = None if self.seed is None else (self.seed + choice) % 2**64  # torch's range (it wraps -1 too)
        if self.ignore_eos:
            stop_ids = ()
        try:
            params = SamplingParams(max_new_tokens=max_new, temperature=self.temperature, top_p=self.top_p,
                                    top_k=max(self.top_k, 0), min_p=self.min_p, stop=self.stops(), stop_ids=stop_ids,
                                    seed=seed, presence_penalty=self.presence_penalty,
                                    frequency_penalty=self.frequency_penalty, logit_bias=self.token_biases(),
                                    repetition_penalty=self.repetition_penalty)
        except UserError as e:
            raise OpenAIError(400, str(e)) from None
        try:
            params.check_vocab(vocab_size)
        except UserError as e:
            raise OpenAIError(400, str(e), param="logit_bias") from None
        return params


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(400, f"best_of is {self.best_of} and n is {self.n}: this server returns every choice "
                              "it generates, so best_of must equal n (or be left out)", param="best_of")
        self._refuse_streamed_logprobs(self.logprobs is not None)
        if self.echo and self.logprobs is not None and self.suffix is not None:
            # the scored prompt would be the infilling one (the suffix and infill pieces too), not the echoed text
            raise OpenAIError(400, "echo with logprobs cannot be combined with suffix: it scores the prompt's tokens, "
                              "and an infilling prompt's tokens are not the echoed text", param="echo")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts or token lists (OpenAI accepts all four shapes)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for "system"
    content: str | list[dict]

    def text(self) -> str:
        """The content as text (a list of parts is joined; only text parts are supported)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: int | None = None
    # not supported: read only to refuse them, since a client asking for them relies on them
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None
    tool_choice: str | dict | None = None  # "none" and "auto" (with no tools: none) are what we do anyway

    @model_validator(mode="before")
    @classmethod
    def _refuse_tool_call_history(cls, data: Any) -> Any:
        # a history from a function-calling client: an assistant turn that made tool calls (its content often
        # null) and the tools' answers. Said as such, not as a wrong type of content or an unknown role.
        messages = data.get("messages") if isinstance(data, dict) else None
        for i, m in enumerate(messages if isinstance(messages, list) else ()):
            if not isinstance(m, dict):
                continue  # a wrong shape, named by validation
            if m.get("tool_calls") or m.get("function_call") or m.get("role") in ("tool", "function"):
                raise OpenAIError(400, f"messages[{i}] is part of a function call (tool_calls, function_call or "
                                  f"role {m.get('role')!r}): function calling is not supported by this server",
                                  param=f"messages.{i}")
        return data

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        self._refuse_streamed_logprobs(self.logprobs)
        if self.top_logprobs and not self.logprobs:  # 0: what some clients send beside logprobs false
            raise OpenAIError(400, f"top_logprobs needs logprobs: true (got top_logprobs {self.top_logprobs} "
                              "without it, which would return no logprobs)", param="top_logprobs")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} (function calling) are not supported by this server", param=name)
        if self.tool_choice not in (None, "none", "auto"):
            raise OpenAIError(400, f"tool_choice {self.tool_choice!r} asks for a function call, which this server "
                              "does not make (function calling is not supported)", param="tool_choice")
        if (self.response_format or {}).get("type", "text") != "text":
            raise OpenAIError(400, "response_format other than text is not supported by this server",
                              param="response_format")
        return self

    def message_dicts(self) -> list[dict]:
        return message_dicts(self.messages)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the prompt formats take them ("developer", OpenAI's newer name, read as "system")."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
