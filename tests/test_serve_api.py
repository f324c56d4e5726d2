"""The OpenAI-compatible server against the official `openai` client and raw HTTP: completion, infilling
through `suffix`, chat, streaming, n > 1, stop sequences, logprobs, auth, and 4xx answers to bad input."""

from __future__ import annotations

import gzip
import json
import logging
import random
import threading
import time

import httpx
import openai
import pytest
import torch

from codellama.generate import Generator
from codellama.sampling import SamplingParams
from serve_helpers import MODEL, running_server, tiny_model, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    with running_server(tiny_model(), tok, max_batch=8, max_tokens=200) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tok):
    """The plain Generator on a twin of the served model (same seed, same weights, its own cache)."""
    gen = Generator(tiny_model(), tok)

    def run(ids, max_new, decode=None, stop=(), stop_ids=None, **sampling):
        params = SamplingParams(max_new_tokens=max_new, stop=stop, stop_ids=stop_ids, **sampling)
        # completions keep the first piece's leading space (they continue the prompt); chat answers do not
        return gen.generate([ids], params, decode=decode or tok.decode_infilling)[0]

    return run


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["slots"] == 8


def test_completion_equals_plain_generator(client, tok, reference):
    prompt = "def fibonacci(n):"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ref = reference(tok.encode(prompt, bos=True), 12)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(tok.encode(prompt, bos=True))
    assert out.usage.completion_tokens == len(ref.tokens)


def test_infilling_through_suffix(client, tok, reference):
    from codellama.prompts import infill_tokens

    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    out = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=10, temperature=0)
    ref = reference(infill_tokens(tok, prefix, suffix), 10, tok.decode_infilling,
                    stop_ids=tuple(tok.stop_ids | {tok.eot_id}))
    assert out.choices[0].text == ref.text
    assert out.usage.prompt_tokens == len(infill_tokens(tok, prefix, suffix))


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
def test_an_editor_typing_at_the_cursor_reuses_the_file_around_it_with_spm(tok, reference, suffix_first):
    """With `serve --spm` a `suffix` request is laid out suffix-first, so what is typed at the cursor changes
    only the prompt's end: the next request reuses the suffix and the prefix. PSM puts the suffix after the
    cursor's text, so it is prefilled again."""
    from codellama.prompts import infill_tokens

    prefix = "import os\n\n\ndef size(path):\n    "
    suffix = "\n    return total\n\n\ndef main():\n    print(size(os.getcwd()))\n" * 3
    with running_server(tiny_model(), tok, max_batch=1, suffix_first=suffix_first) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        first = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=4, temperature=0)
        typed = prefix + "total = 0\n    "
        out = client.completions.create(model=MODEL, prompt=typed, suffix=suffix, max_tokens=4, temperature=0)
    ids = infill_tokens(tok, typed, suffix, suffix_first=suffix_first)
    ref = reference(ids, 4, tok.decode_infilling, stop_ids=tuple(tok.stop_ids | {tok.eot_id}))
    assert out.choices[0].text == ref.text and out.usage.prompt_tokens == len(ids)
    before = infill_tokens(tok, prefix, suffix, suffix_first=suffix_first)
    shared = next(i for i, (a, b) in enumerate(zip(before, ids)) if a != b)  # where the two prompts part
    assert first.usage.prompt_tokens == len(before)
    assert out.usage.prompt_tokens_details.cached_tokens == shared
    if suffix_first:  # all but the prefix's last piece or two (the typed text may join them)
        assert shared >= len(before) - 2
    else:  # the suffix is prefilled again
        assert shared < len(before) - len(tok.encode_infilling(suffix))


def test_chat(client, tok, reference):
    from codellama.prompts import chat_tokens

    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Sort a list."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    ref = reference(chat_tokens(tok, messages), 10, tok.decode)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.object == "chat.completion"
    developer = [{**messages[0], "role": "developer"}, messages[1]]  # OpenAI's newer name for system
    again = client.chat.completions.create(model=MODEL, messages=developer, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == ref.text
    assert (again.usage.prompt_tokens, again.usage.completion_tokens) == (out.usage.prompt_tokens, 10)
    # the same prompt again: its slot held all of it but the last token, which a prefill always computes
    assert again.usage.prompt_tokens_details.cached_tokens == out.usage.prompt_tokens - 1


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt="import numpy as np\n", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    msgs = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0).choices[0]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "x = ", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_sse_events_are_one_line_for_line_readers(server):
    # U+2028, U+2029 and U+0085, which JSON leaves raw, end a line for str.splitlines() (httpx's iter_lines,
    # requests' with decode_unicode): an echoed prompt or a generated text holding one split its event
    prompt = "a\u2028b\u2029c\x85d"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": True, "echo": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["choices"][0]["text"] == prompt


def test_n_choices(client):
    greedy = client.completions.create(model=MODEL, prompt="for i in", max_tokens=8, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2] and len({c.text for c in greedy.choices}) == 1
    kw = dict(model=MODEL, prompt="for i in", max_tokens=8, temperature=1.5, n=4, seed=11)
    sampled = client.completions.create(**kw)
    assert len({c.text for c in sampled.choices}) > 1  # choices draw from different seeds
    assert [c.text for c in client.completions.create(**kw).choices] == [c.text for c in sampled.choices]
    streamed = {}
    for chunk in client.completions.create(stream=True, **kw):
        streamed[chunk.choices[0].index] = streamed.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert [streamed[i] for i in range(4)] == [c.text for c in sampled.choices]
    two_prompts = client.completions.create(model=MODEL, prompt=["a", "b = 1"], max_tokens=4, temperature=0, n=2)
    assert len(two_prompts.choices) == 4


def test_stop_sequences(client):
    kw = dict(model=MODEL, prompt="class Stack:", max_tokens=24, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    stop = free[6:9]
    assert stop and free.find(stop) >= 0
    out = client.completions.create(stop=[stop, "@@never@@"], **kw).choices[0]
    assert out.text == free[: free.find(stop)] and out.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == out.text


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="while True:", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3 and abs(max(top.values()) - chosen) < 1e-5  # greedy: the top one
    assert "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(client):
    # lm-evaluation-harness's loglikelihood through an OpenAI server: token-id prompts, echo, logprobs=1,
    # max_tokens=1; it reads token_logprobs[context:] of the prompt and whether each token was the top one
    prompts = [[1, 450, 4086, 338, 263, 1243, 29892, 322], [1, 822, 285, 29898]]
    out = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    model = tiny_model()
    for prompt, choice in zip(prompts, out.choices):
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(prompt) + 1  # the prompt, then the new token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        with torch.inference_mode():  # the whole prompt in one causal pass, no cache: the definition
            expected = torch.log_softmax(model(torch.tensor([prompt]))[0, :-1], dim=-1)
        expected = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert lp.token_logprobs[1 : len(prompt)] == pytest.approx(expected.tolist(), abs=1e-4)
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_with_max_tokens_0_returns_the_prompt_alone(client):
    # OpenAI's (and vLLM's) way to only score a prompt, as lm-evaluation-harness 0.3 and HELM ask
    kw = dict(model=MODEL, prompt="def add(a, b):", echo=True, logprobs=2, temperature=0)
    scored = client.completions.create(max_tokens=1, **kw).choices[0].logprobs
    out = client.completions.create(max_tokens=0, **kw)
    choice = out.choices[0]
    assert choice.text == kw["prompt"] and choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert choice.logprobs.tokens == scored.tokens[:-1] and choice.logprobs.token_logprobs == scored.token_logprobs[:-1]
    assert choice.logprobs.top_logprobs == scored.top_logprobs[:-1]
    del kw["logprobs"]
    chunks = list(client.completions.create(max_tokens=0, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == kw["prompt"]
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # without echo there is nothing to answer
        client.completions.create(max_tokens=0, **{**kw, "echo": False})


# Code Llama spells 🙂 in four byte-fallback pieces (<0xF0> <0x9F> <0x99> <0x82>)
MULTIBYTE = "café 中文 🙂"


@pytest.mark.parametrize("prompt,text,offsets", [
    # <s> ▁c afé ▁ 中 文 ▁ <0xF0> <0x9F> <0x99> <0x82>, then the generated token; the four bytes of 🙂 at 🙂
    (MULTIBYTE, MULTIBYTE, [0, 0, 1, 4, 5, 6, 7, 8, 8, 8, 8, 9]),
    # the same ids sent as ids: the echo is their decoding, which keeps the leading space of ▁c
    ([1, 274, 28059, 29871, 30275, 30333, 29871, 243, 162, 156, 133], " " + MULTIBYTE,
     [0, 0, 2, 5, 6, 7, 8, 9, 9, 9, 9, 10]),
], ids=["text", "token-ids"])
def test_echo_text_offsets_index_the_text_of_multibyte_prompts(client, prompt, text, offsets):
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=1, temperature=0)
    choice = out.choices[0]
    assert choice.text.startswith(text) and choice.logprobs.text_offset == offsets


def _assert_offsets_place_each_token(text: str, pieces: list[bytes], offsets: list[int]) -> None:
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for piece, at in zip(pieces, offsets):
        if piece and piece[0] & 0xC0 == 0x80:  # a character's later byte: it belongs to the one at `at`
            assert piece in text[at].encode()
        else:
            assert text[at:].encode().startswith(piece)


@pytest.mark.parametrize("which", ["codellama", "smollm2"])
def test_token_bytes_and_offsets_of_partial_characters(which, tok, smollm2):
    from codellama.serve.tokens import text_offsets, token_bytes

    vocab = tok if which == "codellama" else smollm2  # byte-fallback SentencePiece; byte-level BPE
    text = MULTIBYTE + " 𝔘𓀀 ok"  # SmolLM2 splits 𝔘 and 𓀀 into tokens holding parts of them
    ids = vocab.encode_infilling(text)
    pieces = [token_bytes(vocab, t) for t in ids]
    assert b"".join(pieces) == text.encode() and any(len(p) == 1 and p[0] >= 0x80 for p in pieces)
    offsets = text_offsets(pieces, text, 0)
    _assert_offsets_place_each_token(text, pieces, offsets)
    infill = [vocab.prefix_id, vocab.suffix_id, vocab.middle_id, vocab.eot_id] if which == "codellama" else []
    assert all(token_bytes(vocab, t) == b"" for t in infill)  # ▁<EOT> & co.: decoding drops them, no space
    cut = text[:6]  # a stop string found after "café 中": the tokens past it sit at the end
    assert text_offsets(pieces, cut, 4) == [4 + min(o, len(cut)) for o in offsets]


def test_chat_logprobs_bytes_are_the_tokens_own(client):
    # the tiny model answers "x" with a lone byte-fallback piece (<0xD3>): its bytes are that one byte
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=40,
                                         temperature=0, logprobs=True)
    partial = [e for e in out.choices[0].logprobs.content if e.token == "\ufffd"]
    assert partial and all(len(e.bytes) == 1 and e.bytes[0] >= 0x80 for e in partial)


def test_token_id_prompts(client, reference):
    ids = [1, 822, 22172, 7295]
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == reference(ids, 6).text


def test_penalties_and_logit_bias_are_applied(client, tok, reference):
    from codellama.prompts import chat_tokens

    ids = [1, 822, 22172, 7295]
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, frequency_penalty=2,
                                    presence_penalty=0.5, logit_bias={"822": -100, "29871": 3})
    ref = reference(ids, 12, frequency_penalty=2.0, presence_penalty=0.5, logit_bias={822: -100, 29871: 3})
    assert out.choices[0].text == ref.text != plain
    repeats = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                        extra_body={"repetition_penalty": 1.5})  # an extension: vLLM's name
    assert repeats.choices[0].text == reference(ids, 12, repetition_penalty=1.5).text != plain
    x = tok.encode("x", bos=False)[-1]
    forced = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0.7, seed=1,
                                       logit_bias={str(x): 100})
    assert forced.choices[0].text == tok.decode_infilling([x] * 4)
    messages = [{"role": "user", "content": "Sort a list."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                          presence_penalty=-1.5, logit_bias={str(x): 2})
    ref = reference(chat_tokens(tok, messages), 10, tok.decode, presence_penalty=-1.5, logit_bias={x: 2})
    assert chat.choices[0].message.content == ref.text


@pytest.mark.parametrize("create,kwargs,param,match", [
    ("completions", dict(logit_bias={"32016": 1}), "logit_bias", "token id 32016, outside the model's vocabulary"),
    ("chat", dict(logit_bias={"32016": 1}), "logit_bias", "token id 32016"),
    ("chat", dict(logit_bias={"hello": 1}), "logit_bias", "keys must be token ids"),
    ("completions", dict(logit_bias={"5": -101}), "logit_bias.5", "greater than or equal to -100"),
    ("chat", dict(frequency_penalty=2.01), "frequency_penalty", "less than or equal to 2"),
    ("completions", dict(presence_penalty=-3), "presence_penalty", "greater than or equal to -2"),
])
def test_bad_penalties_and_biases_are_400s_naming_the_field(client, create, kwargs, param, match):
    with pytest.raises(openai.BadRequestError, match=match) as e:
        if create == "chat":
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           **kwargs)
        else:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, **kwargs)
    assert e.value.param == param


def _post(url, path, body, timeout: float = 30, **kw):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=timeout,
                      **kw)


@pytest.mark.parametrize(
    "body,status,match",
    [
        ("{not json", 400, "not valid JSON"),
        ("[1, 2]", 400, "JSON object"),
        ("[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
        ('{"prompt": "\\ud800"}', 400, "surrogate"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": MODEL, "prompt": 42}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 150}, 200, None),
        ({"model": MODEL, "prompt": "word " * 600}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": "word " * 400, "max_tokens": 150}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "top_k": -1, "max_tokens": 1}, 200, None),  # vLLM's "off"
        ({"model": MODEL, "prompt": "x", "top_k": -2}, 400, "top_k"),
        ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
        ({"model": MODEL, "prompt": "x", "stop": [f"s{i}" for i in range(33)]}, 400, "stop"),
        # lm-evaluation-harness's humaneval: its five stop strings and the EOS text
        ({"model": MODEL, "prompt": "x", "stop": ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "</s>"]}, 200, None),
        ({"model": MODEL, "prompt": [5, 99999]}, 400, "token ids"),
        ({"model": MODEL, "prompt": "x", "seed": 2**70}, 400, "seed"),
        ({"model": MODEL, "prompt": "x", "seed": 2**63 - 1, "n": 2, "max_tokens": 1}, 200, None),
        ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
        ({"model": MODEL, "prompt": "x", "n": 2, "best_of": 2, "max_tokens": 1}, 200, None),
        ({"model": MODEL, "prompt": "x", "stream": True, "logprobs": 0}, 400, "logprobs"),
    ],
)
def test_bad_completion_requests_get_openai_errors(server, body, status, match):
    r = _post(server[0], "/v1/completions", body)
    assert r.status_code == status, r.text
    if match:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and match in err["message"]


@pytest.mark.parametrize(
    "body,match",
    [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "logprobs": True}, "logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
         "response_format"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "first"}]}, ""),  # prompts' own rule
    ],
)
def test_bad_chat_requests(server, body, match):
    r = _post(server[0], "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


def test_a_chat_the_prompt_format_refuses_names_messages(server):
    # Code Llama Instruct's format takes alternating turns; the 400 names the field, as OpenAI's errors do
    two_users = [*HI, {"role": "user", "content": "again"}]
    r = _post(server[0], "/v1/chat/completions", {"model": MODEL, "messages": two_users})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages" and "roles must alternate" in err["message"], err


def test_a_chat_longer_than_the_context_names_messages(server):
    long = [{"role": "user", "content": "word " * 600}]
    r = _post(server[0], "/v1/chat/completions", {"model": MODEL, "messages": long})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages", err


def test_refused_requests_have_their_log_line(server, caplog):
    # each request logs one JSON line: those refused before they ran wrote none (a client sending the wrong
    # model or key again and again left no trace in the server's log or --log-file)
    caplog.set_level(logging.INFO, logger="codellama.serve")
    for path, body, status in (("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
                               ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
                               ("/v1/nothing", {}, 404)):
        assert httpx.post(server[0] + path, json=body, timeout=30).status_code == status
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "codellama.serve"]
    lines = [line for line in logged if line["status"] == "refused"]  # not an earlier test's stream ending now
    assert [(line["path"], line["http_status"]) for line in lines] == [
        ("/v1/completions", 404), ("/v1/chat/completions", 400), ("/v1/nothing", 404)]
    assert lines[0]["code"] == "model_not_found" and lines[1]["param"] == "messages"


def test_a_stream_left_midway_logs_the_tokens_it_sent(server, caplog):
    # its log line and /metrics counted 0 completion tokens, however many were streamed before the client left
    caplog.set_level(logging.INFO, logger="codellama.serve")
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 200, "stream": True, "temperature": 0,
            "logit_bias": {str(t): -100 for t in server[1].tokenizer.stop_ids}}  # 200 tokens, no early stop
    pieces = 0
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            pieces += line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"] != ""
            if pieces == 3:
                break
    deadline = time.monotonic() + 30
    while not (lines := [json.loads(r.getMessage()) for r in caplog.records
                         if r.name == "codellama.serve" and '"disconnected"' in r.getMessage()]):
        assert time.monotonic() < deadline, "no log line for the stream its client left"
        time.sleep(0.1)
    assert lines[-1]["completion_tokens"] >= 3


def test_unknown_route_and_method(server):
    r = httpx.get(server[0] + "/v1/nothing")
    # OpenAI's own answer to an unknown URL (was type not_found_error, which OpenAI does not use)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "unknown_url"
    for method in ("GET", "OPTIONS", "HEAD"):
        r = httpx.request(method, server[0] + "/v1/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST", method
        assert method == "HEAD" or set(r.json()["error"]) == {"message", "type", "param", "code"}


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}
# (method, path, body: a dict sent as JSON with the model and max_tokens 1 added, or bytes as they are, headers,
#  the status, words of the error's message); one server answers them all on one connection, in order
HOSTILE = [
    # prompts of every wrong shape
    ("POST", COMPLETIONS, {"prompt": None}, JSON, 400, "'prompt' is required"),
    ("POST", COMPLETIONS, {"prompt": {"a": 1}}, JSON, 400, "expected str or list[str]"),
    ("POST", COMPLETIONS, {"prompt": []}, JSON, 400, "prompt is empty"),
    ("POST", COMPLETIONS, {"prompt": [[]]}, JSON, 400, "prompt 0 is empty"),
    ("POST", COMPLETIONS, {"prompt": [-1, 5]}, JSON, 400, "outside this model's vocabulary"),
    ("POST", COMPLETIONS, {"prompt": [1, 2**40]}, JSON, 400, "outside this model's vocabulary"),
    ("POST", COMPLETIONS, {"prompt": ["a", 1]}, JSON, 400, "expected str or list[str]"),
    ("POST", COMPLETIONS, {"prompt": [True, False]}, JSON, 400, "expected str or list[str]"),
    ("POST", COMPLETIONS, {"prompt": [1, 2], "suffix": "x"}, JSON, 400, "`suffix` needs a text prompt"),
    # echo + logprobs scores the prompt's tokens: with suffix those are the infilling prompt's (the suffix and
    # the infill pieces too), not the echoed text (was answered with tokens that did not spell the text)
    ("POST", COMPLETIONS, {"prompt": "def f(", "suffix": "):", "echo": True, "logprobs": 0}, JSON, 400,
     "echo with logprobs cannot be combined with suffix"),
    ("POST", COMPLETIONS, {"prompt": "def f(", "suffix": "):", "echo": True}, JSON, 200, None),
    ("POST", COMPLETIONS, {"prompt": ""}, JSON, 200, None),  # OpenAI completes an empty prompt too
    # numbers: huge, fractional, not finite, out of range
    ("POST", COMPLETIONS, {"prompt": "x", "max_tokens": 2**70}, JSON, 400, "more than this server allows"),
    ("POST", COMPLETIONS, {"prompt": "x", "max_tokens": 1.0}, JSON, 400, "'max_tokens': Input should be a valid integer"),
    ("POST", COMPLETIONS, b'{"prompt": "x", "max_tokens": 1e400}', JSON, 400, "'max_tokens'"),
    ("POST", COMPLETIONS, b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", JSON, 400, "not valid JSON"),
    ("POST", COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', JSON, 400, "'temperature': Input should be a finite"),
    ("POST", COMPLETIONS, b'{"prompt": "x", "top_p": -Infinity}', JSON, 400, "'top_p': Input should be a finite"),
    ("POST", COMPLETIONS, b'{"prompt": "x", "presence_penalty": NaN}', JSON, 400, "'presence_penalty'"),
    # penalties and logit_bias: applied in OpenAI's ranges (were refused unless neutral); logit_bias's keys are
    # token ids in strings
    ("POST", COMPLETIONS, {"prompt": "x", "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}, JSON,
     200, None),
    ("POST", COMPLETIONS, {"prompt": "x", "frequency_penalty": 0.5, "logit_bias": {"5": 100, "7": -2.5}}, JSON, 200,
     None),
    ("POST", CHAT, {"messages": HI, "presence_penalty": -1, "logit_bias": {"32015": -100}}, JSON, 200, None),
    ("POST", COMPLETIONS, {"prompt": "x", "frequency_penalty": 99}, JSON, 400,
     "'frequency_penalty': Input should be less than or equal to 2"),
    ("POST", CHAT, {"messages": HI, "presence_penalty": -2.5}, JSON, 400,
     "'presence_penalty': Input should be greater than or equal to -2"),
    ("POST", CHAT, {"messages": HI, "logit_bias": {"5": 101}}, JSON, 400,
     "'logit_bias.5': Input should be less than or equal to 100"),
    ("POST", COMPLETIONS, {"prompt": "x", "logit_bias": {"5": "1"}}, JSON, 400, "'logit_bias.5': Input should be a"),
    ("POST", COMPLETIONS, {"prompt": "x", "logit_bias": {"x": 1}}, JSON, 400,
     "'logit_bias': keys must be token ids, integers >= 0 written as strings"),
    ("POST", CHAT, {"messages": HI, "logit_bias": {"-1": 1}}, JSON, 400, "keys must be token ids"),
    ("POST", CHAT, {"messages": HI, "logit_bias": {"1.5": 1}}, JSON, 400, "keys must be token ids"),
    ("POST", COMPLETIONS, {"prompt": "x", "logit_bias": {"32016": 1}}, JSON, 400,
     "logit_bias has token id 32016, outside the model's vocabulary of 32016"),
    ("POST", COMPLETIONS, {"prompt": "x", "logit_bias": [5]}, JSON, 400, "'logit_bias'"),
    ("POST", COMPLETIONS, {"prompt": "x", "top_k": 2**70}, JSON, 400, "'top_k'"),
    # extensions: min_p and repetition_penalty are applied; others that shape the output are refused by name
    ("POST", COMPLETIONS, {"prompt": "x", "min_p": 0.1, "repetition_penalty": 1.2, "temperature": 0.8}, JSON, 200,
     None),
    ("POST", CHAT, {"messages": HI, "repetition_penalty": 0}, JSON, 400,
     "'repetition_penalty': Input should be greater than 0"),
    ("POST", COMPLETIONS, {"prompt": "x", "min_p": 1.5}, JSON, 400, "'min_p': Input should be less than or equal to 1"),
    ("POST", CHAT, {"messages": HI, "guided_json": {"type": "object"}}, JSON, 400,
     "guided_json (constrained decoding, an extension of other servers) is not supported"),
    ("POST", COMPLETIONS, {"prompt": "x", "mirostat": 2}, JSON, 400, "mirostat (a sampling setting"),
    ("POST", CHAT, {"messages": HI, "repeat_penalty": 1.1}, JSON, 400, "repetition_penalty is served"),
    ("POST", COMPLETIONS, {"prompt": "x", "use_beam_search": 1}, JSON, 400, "use_beam_search"),
    # the values that change nothing, as llama.vscode sends them beside its chat requests
    ("POST", CHAT, {"messages": HI, "grammar": None, "json_schema": {}, "typical_p": 1, "repeat_penalty": 1.0,
                    "dry_multiplier": 0, "xtc_probability": 0, "dynatemp_range": 0, "mirostat": 0,
                    "use_beam_search": False, "samplers": "edkypmxt"}, JSON, 200, None),
    ("POST", COMPLETIONS, {"prompt": "x", "seed": 1.5}, JSON, 400, "'seed'"),
    ("POST", COMPLETIONS, {"prompt": "x", "n": -1}, JSON, 400, "'n'"),
    ("POST", COMPLETIONS, {"prompt": "x", "n": 10**9}, JSON, 400, "'n'"),
    ("POST", COMPLETIONS, {"prompt": "x", "logprobs": 21}, JSON, 400, "'logprobs'"),
    ("POST", COMPLETIONS, {"prompt": "x", "logprobs": -1}, JSON, 400, "'logprobs'"),
    ("POST", COMPLETIONS, {"prompt": "x", "logprobs": True}, JSON, 400, "'logprobs'"),
    # stop strings
    ("POST", COMPLETIONS, {"prompt": "x", "stop": ["", ""]}, JSON, 400, "stop sequences must be non-empty"),
    ("POST", COMPLETIONS, {"prompt": "x", "stop": [None]}, JSON, 400, "'stop'"),
    ("POST", COMPLETIONS, {"prompt": "x", "stop": "a" * 100_000}, JSON, 200, None),
    # text that is not text, fields of the wrong type, fields we do not know
    ("POST", COMPLETIONS, b'{"prompt": "x\\ud800"}', JSON, 400, "lone UTF-16 surrogate"),
    # surrogates json.loads lets through unless the body is decoded strictly (were a 500: the tokenizer's
    # TypeError): UTF-8 bytes of one, and an escape in a UTF-16 or UTF-32 body, which JSON allows
    ("POST", COMPLETIONS, b'{"prompt": "x\xed\xa0\x80"}', JSON, 400, "not valid JSON: 'utf-8' codec can't decode"),
    ("POST", COMPLETIONS, '{"prompt": "x\\ud800"}'.encode("utf-16"), JSON, 400, "lone UTF-16 surrogate"),
    ("POST", CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}'.encode("utf-32"), JSON, 400,
     "lone UTF-16 surrogate"),
    ("POST", COMPLETIONS, '{"prompt": "x", "max_tokens": 1}'.encode("utf-16"), JSON, 200, None),
    ("POST", COMPLETIONS, {"prompt": "x", "stream_options": "x"}, JSON, 400, "'stream_options'"),
    ("POST", CHAT, {"messages": HI, "stream_options": {"include_usage": True}}, JSON, 400,
     "stream_options is only allowed when stream is true"),
    # was read as truthy: "false" asked for the usage chunk
    ("POST", COMPLETIONS, {"prompt": "x", "stream": True, "stream_options": {"include_usage": "false"}}, JSON, 400,
     "'stream_options.include_usage': Input should be a valid boolean"),
    ("POST", CHAT, {"messages": HI, "stream": True, "stream_options": {"include_usage": None}}, JSON, 200, None),
    ("POST", COMPLETIONS, {"prompt": "x", "unknown": {"deep": [[{"x": None}]]}}, JSON, 200, None),
    # chat: messages of every wrong shape, content parts, roles, function calling, response formats
    ("POST", CHAT, {"messages": None}, JSON, 400, "'messages' is required"),
    ("POST", CHAT, {"messages": {}}, JSON, 400, "'messages'"),
    ("POST", CHAT, {"messages": [None]}, JSON, 400, "'messages.0'"),
    ("POST", CHAT, {"messages": [{"role": "user"}]}, JSON, 400, "'messages.0.content' is required"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": ["hi"]}]}, JSON, 400, "'messages.0.content'"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, JSON, 200, None),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     JSON, 400, "only text content parts"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, JSON, 400, "only text content"),
    # a function-calling client's history: was "expected str or list" about content null, or an unknown role
    ("POST", CHAT, {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, JSON, 400,
     "messages[1] is part of a function call (tool_calls"),
    ("POST", CHAT, {"messages": [*HI, {"role": "assistant", "content": "x", "function_call": {"name": "f"}}]}, JSON,
     400, "function calling is not supported"),
    ("POST", CHAT, {"messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]}, JSON, 400,
     "role 'tool'): function calling is not supported"),
    ("POST", CHAT, {"messages": [*HI, {"role": "assistant", "content": None}]}, JSON, 400, "'messages.1.content'"),
    ("POST", CHAT, {"messages": [{"role": 5, "content": "x"}]}, JSON, 400, "'messages.0.role'"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, JSON, 200, None),
    ("POST", CHAT, {"messages": [{"role": "system", "content": "s"}]}, JSON, 400, "only a system message"),
    ("POST", CHAT, {"messages": HI, "tools": [{"type": "function"}]}, JSON, 400, "tools (function calling)"),
    ("POST", CHAT, {"messages": HI, "functions": [{"name": "f"}]}, JSON, 400, "functions (function calling)"),
    ("POST", CHAT, {"messages": HI, "tools": [], "tool_choice": "none"}, JSON, 200, None),
    ("POST", CHAT, {"messages": HI, "tool_choice": "required"}, JSON, 400, "tool_choice 'required' asks for"),
    ("POST", CHAT, {"messages": HI, "tool_choice": {"type": "function", "function": {"name": "f"}}}, JSON, 400,
     "function calling is not supported"),
    ("POST", CHAT, {"messages": HI, "response_format": {"type": "json_object"}}, JSON, 400, "response_format"),
    ("POST", CHAT, {"messages": HI, "response_format": "json"}, JSON, 400, "'response_format'"),
    ("POST", CHAT, {"messages": HI, "response_format": {"type": "text"}}, JSON, 200, None),
    ("POST", CHAT, {"messages": HI, "logprobs": 1}, JSON, 400, "'logprobs'"),
    ("POST", CHAT, {"messages": HI, "top_logprobs": 21}, JSON, 400, "'top_logprobs'"),
    # top_logprobs asks for logprobs only with logprobs: true, as OpenAI says (was answered with none); 0 is
    # what some clients send beside logprobs false
    ("POST", CHAT, {"messages": HI, "top_logprobs": 2}, JSON, 400, "top_logprobs needs logprobs: true"),
    ("POST", CHAT, {"messages": HI, "logprobs": False, "top_logprobs": 2}, JSON, 400, "top_logprobs needs logprobs"),
    ("POST", CHAT, {"messages": HI, "logprobs": False, "top_logprobs": 0}, JSON, 200, None),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, JSON, 400, "lone UTF-16 surrogate"),
    # headers and bodies: OpenAI reads any content type as JSON; a compressed body is named, not mis-parsed
    ("POST", COMPLETIONS, {"prompt": "x"}, {}, 200, None),
    ("POST", COMPLETIONS, {"prompt": "x"}, {"content-type": "text/plain"}, 200, None),
    ("POST", COMPLETIONS, gzip.compress(b'{"prompt": "x"}'), {**JSON, "content-encoding": "gzip"}, 415,
     "Content-Encoding 'gzip' is not supported"),
    ("POST", COMPLETIONS, b"", JSON, 400, "not valid JSON"),
    ("POST", COMPLETIONS, b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 400, "not valid JSON"),
    # methods and paths
    ("HEAD", "/v1/models", None, {}, 200, None),
    ("HEAD", "/health", None, {}, 200, None),
    ("OPTIONS", "/v1/models", None, {}, 405, "Method Not Allowed"),
    ("DELETE", "/v1/models/x", None, {}, 405, "Method Not Allowed"),
    ("GET", "/v1/nothing", None, {}, 404, "Not Found"),
    # a trailing slash is served in place (was a 307 redirect, an empty answer to curl without -L)
    ("POST", COMPLETIONS + "/", {"prompt": "x"}, JSON, 200, None),
    ("POST", CHAT + "/", {"messages": HI}, JSON, 200, None),
    ("GET", "/v1/models/", None, {}, 200, None),  # the list, not the model ""
    ("GET", "/health/", None, {}, 200, None),
    ("POST", "/v1/embeddings", b"{}", JSON, 404, "Not Found"),
]


def test_hostile_requests_get_4xx_in_openai_shape_and_the_server_goes_on(server):
    url, _ = server
    wrong = []
    with httpx.Client(base_url=url, timeout=30) as http:  # one connection: none of them may break it
        for method, path, body, headers, status, words in HOSTILE:
            content = json.dumps({"model": MODEL, "max_tokens": 1, **body}) if isinstance(body, dict) else body
            r = http.request(method, path, content=content, headers=headers)
            if r.status_code != status:
                wrong.append((method, path, body, r.status_code, r.text[:200]))
            elif words is not None:
                err = r.json().get("error", {})
                if set(err) != {"message", "type", "param", "code"} or words not in err["message"]:
                    wrong.append((method, path, body, r.status_code, err))
        assert not wrong, "\n".join(map(str, wrong))
        r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "ok", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# values of every JSON type, and per field values it accepts, edges included
ODD_VALUES = [None, True, False, 0, -1, 1, 3, 0.5, -0.5, 2**63, -2**63, 1e308, "", "x", "\u0000", "[INST]", [], [1],
              [1, -5], [2**40], ["a", 1], [[]], [""], ["a"] * 50, {}, {"a": 1}, {"1": 100}, "hi", [[1]], [{}],
              [{"role": "user"}], [{"role": "x", "content": 1}], [{"role": "user", "content": [{"type": "image_url"}]}]]
ACCEPTED = {
    "prompt": ["", "x", [1, 2], ["a", "b"], [[1, 2], [3]], "[INST]"], "suffix": ["", "x y"], "max_tokens": [0, 1, 3],
    "max_completion_tokens": [1, 3], "temperature": [0, 0.7, 2], "top_p": [0.1, 1], "n": [1, 3],
    "stop": ["\n", ["a", "b"], []], "seed": [0, 2**63 - 1], "stream": [True, False], "echo": [True, False],
    "best_of": [1, 3], "presence_penalty": [-2, 2], "frequency_penalty": [-2, 2], "logit_bias": [{"1": 100}, {}],
    "user": ["u"], "stream_options": [{"include_usage": True}], "top_logprobs": [0, 3],
    "response_format": [{"type": "text"}], "tools": [[]],
    "messages": [[{"role": "system", "content": "be brief"}, *HI], [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]],
}
COMPLETION_LOGPROBS, CHAT_LOGPROBS = [0, 3], [True, False]
COMPLETION_ONLY = {"prompt", "suffix", "echo", "best_of"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools"}
ERROR_FIELDS = {"message", "type", "param", "code"}


def test_random_mixes_of_fields_get_answers_or_openai_errors(server):
    # what the table above does not list: three fields of a valid request at a time set to values they accept
    # or to values of any type (seeded); every answer is a 200 or a 4xx in OpenAI's error shape, never a 500
    url, _ = server
    rng, wrong, answered = random.Random(5), [], 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(240):
            chat = i % 2 == 1
            body = {"model": MODEL, "max_tokens": 2, **({"messages": HI} if chat else {"prompt": "def f("})}
            fields = [f for f in ACCEPTED if f not in (COMPLETION_ONLY if chat else CHAT_ONLY)] + ["logprobs"]
            for field in rng.sample(fields, 3):
                accepted = ACCEPTED.get(field) or (CHAT_LOGPROBS if chat else COMPLETION_LOGPROBS)
                body[field] = rng.choice(accepted if rng.random() < 0.75 else ODD_VALUES)
            r = http.post(CHAT if chat else COMPLETIONS, json=body)
            answered += r.status_code == 200
            openai_error = 400 <= r.status_code < 500 and set(r.json().get("error", {})) == ERROR_FIELDS
            if r.status_code != 200 and not openai_error:
                wrong.append((body, r.status_code, r.text[:200]))
        assert not wrong, "\n".join(map(str, wrong[:5]))
        assert answered > 60  # the valid mixes ran too (84 with this seed)
        assert http.get("/health").status_code == 200


def test_a_bug_is_a_500_in_openai_shape_and_the_connection_stays_open(server, monkeypatch):
    url, engine = server

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with httpx.Client(base_url=url, timeout=30) as http:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        with monkeypatch.context() as patch:
            patch.setattr(engine, "submit", broken)
            r = http.post(COMPLETIONS, json=body)
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal server error: RuntimeError"
        assert r.headers.get("connection") != "close"
        assert http.post(COMPLETIONS, json=body).status_code == 200  # the same connection answers on


def _model_answering(token: int):
    """The tiny model with weights that make every step's greedy token `token`: the layers add nothing to the
    residual, every embedding is the same positive vector, and only `token`'s output row is not zero."""
    model = tiny_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "output.weight")):
                p.zero_()
        model.tok_embeddings.weight.fill_(1.0)
        model.output.weight[token] = 1.0
    return model


def test_an_editors_infilling_prompt_stops_at_eot(tok):
    # Continue (provider openai, a model named codellama) writes Code Llama's infilling format into the prompt
    # and stops at "<EOT>"; decoding drops ▁<EOT>, so only its id can end the middle, as with `suffix`
    prompt = "<PRE> def add(a, b):\n    <SUF>\n    return c <MID>"
    with running_server(_model_answering(tok.eot_id), tok, max_batch=2) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for kw in ({"prompt": prompt, "stop": ["<PRE>", "<SUF>", "<MID>", "<EOT>"]},
                   {"prompt": "def add(a, b):\n    ", "suffix": "\n    return c"}):
            out = client.completions.create(model=MODEL, max_tokens=8, temperature=0, **kw)
            assert (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens) == ("", "stop", 0)
        plain = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=8, temperature=0)
        assert plain.choices[0].finish_reason == "length"  # outside infilling ▁<EOT> is a token like any


def test_llama_vscodes_chat_request_runs(server):
    """llama.vscode's chat (src/llama-server.ts) sends llama.cpp's sampling fields at values that change nothing,
    and max_tokens -1, llama.cpp's "no limit": answered up to the server's --max-tokens (200 here)."""
    body = {"messages": [{"role": "system", "content": "You are an expert coder."},
                         {"role": "user", "content": "Rename x to y: x = 1"}],
            "stream": False, "cache_prompt": True, "samplers": "edkypmxt", "temperature": 0.8, "dynatemp_range": 0,
            "dynatemp_exponent": 1, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1, "xtc_probability": 0,
            "xtc_threshold": 0.1, "repeat_last_n": 64, "repeat_penalty": 1, "presence_penalty": 0,
            "frequency_penalty": 0, "dry_multiplier": 0, "dry_base": 1.75, "dry_allowed_length": 2,
            "dry_penalty_last_n": -1, "max_tokens": -1, "timings_per_token": False}
    out = _post(server[0], "/v1/chat/completions", body, timeout=120)
    assert out.status_code == 200, out.text
    assert 0 < out.json()["usage"]["completion_tokens"] <= 200


def test_auth_accepted_and_refused():
    with running_server(tiny_model(), tokenizer(), max_batch=2, api_key="s3cret") as (url, _):
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="a", max_tokens=2).choices
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            bad.completions.create(model=MODEL, prompt="a", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.post(url + "/v1/completions", json={"prompt": "a"}).status_code == 401  # no header at all
        assert httpx.get(url + "/health").status_code == 200  # health stays open for probes
    # an empty key (CODELLAMA_API_KEY= in a script) is no key, as the startup line's "auth off" says
    with running_server(tiny_model(), tokenizer(), max_batch=2, api_key="") as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 200
    # a key read from a file or an env file keeps its newline: clients' tokens are compared stripped, so it matched none
    with running_server(tiny_model(), tokenizer(), max_batch=2, api_key="s3cret\n") as (url, _):
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_cors_lets_the_named_origins_pages_call_the_api(server):
    page = "http://editor.test:3000"
    preflight = {"origin": page, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type,x-stainless-os"}
    with running_server(tiny_model(), tokenizer(), max_batch=2, api_key="s3cret", cors_origins=(page,)) as (url, _):
        ok = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == page
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        refused = httpx.options(url + "/v1/chat/completions", headers={**preflight, "origin": "http://evil.test"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        body = {"prompt": "a", "max_tokens": 2}
        answer = httpx.post(url + "/v1/completions", json=body,
                            headers={"origin": page, "authorization": "Bearer s3cret"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == page
        # an error the page can read: without the header the browser would hide the 401 behind a CORS failure
        wrong = httpx.post(url + "/v1/completions", json=body, headers={"origin": page})
        assert wrong.status_code == 401 and wrong.headers["access-control-allow-origin"] == page
    # by default no origin is allowed: browsers refuse pages' calls (an open port is not open to every web page)
    plain = httpx.post(server[0] + "/v1/completions", json=body, headers={"origin": page})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_a_default_max_tokens_stays_within_the_servers_limit(tok):
    # the client sends no max_tokens: OpenAI's default (16) must not fail against a smaller --max-tokens
    with running_server(tiny_model(), tok, max_batch=2, max_tokens=8) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model=MODEL, prompt="x", extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="more than this server allows"):  # asked for: refused
            client.completions.create(model=MODEL, prompt="x", max_tokens=16)


def test_infilling_refused_on_a_model_without_infill_tokens():
    with running_server(tiny_model(vocab_size=32000), tokenizer("python"), max_batch=2) as (url, _):
        r = _post(url, "/v1/completions", {"model": MODEL, "prompt": "def f(", "suffix": "):", "max_tokens": 4})
        assert r.status_code == 400 and "infill" in r.json()["error"]["message"].lower()
        assert r.json()["error"]["param"] == "suffix"
        assert _post(url, "/v1/completions", {"model": MODEL, "prompt": "def f(", "max_tokens": 2}).status_code == 200


def test_prompt_with_pieces_past_the_embedding_is_a_400():
    # a Python / 34B checkpoint (32000 rows) served with a tokenizer that knows the infill pieces (spec 6.5)
    with running_server(tiny_model(vocab_size=32000), tokenizer("base"), max_batch=2) as (url, _):
        for path, body, param in (("/v1/completions", {"prompt": "a <PRE> b"}, "prompt"),
                                  ("/v1/completions", {"prompt": "def f(", "suffix": "):"}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a <SUF> b"}]},
                                   "messages")):
            r = _post(url, path, {"model": MODEL, "max_tokens": 2, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "outside this model's vocabulary of 32000" in r.json()["error"]["message"]
        assert _post(url, "/v1/completions", {"model": MODEL, "prompt": "def f(", "max_tokens": 2}).status_code == 200


def test_null_fields_mean_their_defaults(client):
    # the openai client sends `null` for an argument given as None; OpenAI reads it as the default
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, seed=None, stop=None, presence_penalty=None,
                 frequency_penalty=None, logit_bias=None)
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=None, logprobs=None, **nulls)
    assert len(out.choices) == 1 and out.choices[0].logprobs is None
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          logprobs=None, top_logprobs=None, **nulls)
    assert chat.choices[0].message.content is not None and chat.choices[0].logprobs is None


def test_type_errors_name_the_field_once(client):
    # a value that fits no member of a union is one problem of that field, not one per member
    with pytest.raises(openai.BadRequestError, match=r"'prompt': expected str or list\[str\]") as e:
        client.completions.create(model=MODEL, prompt=[1, "a"], max_tokens=2)
    assert e.value.param == "prompt" and "more" not in e.value.message
    with pytest.raises(openai.BadRequestError, match="Invalid value for 'messages.0.content'") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=2)
    assert e.value.param == "messages.0.content"


@pytest.mark.parametrize("path,body,obj", [
    ("/v1/completions", {"prompt": ["def f(", "x ="]}, "text_completion"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "chat.completion.chunk"),
])
def test_stream_chunks_follow_openai(server, path, body, obj):
    body = {"model": MODEL, "max_tokens": 3, "n": 2, "stream": True, "stream_options": {"include_usage": True}, **body}
    with httpx.stream("POST", server[0] + path, json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {(chunks[0]["id"], obj,
                                                                                   chunks[0]["created"], MODEL)}
    *pieces, last = chunks
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert all("usage" in c and c["usage"] is None for c in pieces)  # OpenAI sends usage: null until the end
    n_choices = 2 * (len(body["prompt"]) if "prompt" in body else 1)
    for i in range(n_choices):
        mine = [c["choices"][0] for c in pieces if c["choices"][0]["index"] == i]
        assert [ch["finish_reason"] is not None for ch in mine] == [False] * (len(mine) - 1) + [True]
        if obj == "chat.completion.chunk":
            assert mine[0]["delta"]["role"] == "assistant"


def _wait_idle(engine) -> None:
    """Until the engine runs nothing: generations of streams that went away are cancelled at its next step."""
    deadline = time.monotonic() + 30
    while engine.stats()["unfinished"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["unfinished"] == engine.stats()["active"] == engine.stats()["waiting"] == 0


def test_full_server_answers_429_and_a_too_big_request_400(server, client, monkeypatch):
    url, engine = server
    _wait_idle(engine)  # earlier tests' abandoned streams would take part of the room
    # the engine thread pauses before its next step, so the 64 generations below (the server's limit) stay
    # queued however fast the model is: none can finish and make room before the check
    gate, step = threading.Event(), engine.scheduler.step
    monkeypatch.setattr(engine.scheduler, "step", lambda: gate.wait() and step())
    kw = dict(model=MODEL, prompt=["a", "b", "c", "d"], n=16, max_tokens=2)
    try:
        with client.completions.with_streaming_response.create(stream=True, **kw) as held:
            assert held.status_code == 200
            deadline = time.monotonic() + 30
            while engine.stats()["unfinished"] < 64 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="limit of 64"):
                client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    finally:
        gate.set()
    # more than the server ever runs at once is the request's fault: 400, which clients do not retry
    with pytest.raises(openai.BadRequestError, match="80 generations"):
        client.completions.create(**{**kw, "prompt": ["a"] * 5})
    _wait_idle(engine)


def test_too_many_generations_are_refused_before_the_prompts_are_read(client):
    # the count was checked after every prompt was tokenized: 8 MB of short prompts (1.6M) held the event loop,
    # and every other client, for 24 s before the 400; a bad last prompt shows that none was read first
    with pytest.raises(openai.BadRequestError, match="65 generations") as e:
        client.completions.create(model=MODEL, prompt=[[1]] * 64 + [[2**40]], max_tokens=1)
    assert e.value.param == "n"


def test_a_client_leaving_a_request_without_stream_frees_its_slot(server, monkeypatch):
    url, engine = server
    _wait_idle(engine)
    # each step takes a while, so the generation outlives the client; tokens keep coming all along
    step = engine.scheduler.step
    monkeypatch.setattr(engine.scheduler, "step", lambda: time.sleep(0.02) or step())
    before = dict(engine.stats()["finished"])
    with pytest.raises(httpx.ReadTimeout):
        _post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True},
              timeout=0.5)
    _wait_idle(engine)
    after = engine.stats()["finished"]
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1  # not run to its 200 tokens
    assert after.get("length", 0) == before.get("length", 0)


def test_a_huge_body_is_refused_before_it_is_read(server, client):
    url, engine = server
    limit = 64 * engine.context_len * 32  # a full context for each of the server's 64 generations
    body = json.dumps({"model": MODEL, "prompt": "a" * (limit + 10), "max_tokens": 1}).encode()

    def chunked():  # no content-length: the server counts as it reads
        yield from (body[k : k + 65536] for k in range(0, len(body), 65536))

    for content in (body, chunked()):
        r = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices  # and it keeps serving
