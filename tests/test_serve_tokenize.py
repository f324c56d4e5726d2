"""/tokenize and /detokenize on the real server, in llama.cpp's and vLLM's shapes: the ids are those the
completion and chat endpoints run on."""

from __future__ import annotations

import httpx
import pytest

from codellama.prompts import chat_tokens
from serve_helpers import MODEL, running_server, tiny_model, tokenizer

TEXT = "def café(x):\n    return x  # 中"


@pytest.fixture(scope="module")
def server():
    tok = tokenizer()
    with running_server(tiny_model(), tok, max_batch=1) as (url, engine):
        yield url, tok, engine


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def test_llama_cpps_shape(server):
    url, tok, _ = server
    assert post(url, "/tokenize", {"content": TEXT}).json() == {"tokens": tok.encode(TEXT, bos=False)}
    assert post(url, "/tokenize", {"content": TEXT, "add_special": True}).json()["tokens"][0] == tok.bos_id
    pieces = post(url, "/tokenize", {"content": "a🦙", "with_pieces": True}).json()["tokens"]
    # the llama is spelled in byte pieces by this vocabulary: those come as their bytes, the others as text
    assert [p["id"] for p in pieces] == tok.encode("a🦙", bos=False)
    assert any(isinstance(p["piece"], list) for p in pieces)
    assert b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces) \
        == " a🦙".encode()
    ids = tok.encode(TEXT, bos=False)
    assert post(url, "/detokenize", {"tokens": ids}).json()["content"] == " " + TEXT  # llama.cpp keeps the space


def test_vllms_shape_counts_what_the_completion_and_chat_endpoints_run_on(server):
    url, tok, engine = server
    out = post(url, "/tokenize", {"model": MODEL, "prompt": TEXT}).json()
    usage = post(url, "/v1/completions", {"model": MODEL, "prompt": TEXT, "max_tokens": 1}).json()["usage"]
    assert out["count"] == len(out["tokens"]) == usage["prompt_tokens"] and out["max_model_len"] == engine.context_len
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}]
    chat = post(url, "/tokenize", {"model": MODEL, "messages": messages, "return_token_strs": True}).json()
    assert chat["tokens"] == chat_tokens(tok, messages) and chat["token_strs"][1] == tok.id_to_piece(chat["tokens"][1])
    used = post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == used["prompt_tokens"]
    assert post(url, "/detokenize", {"model": MODEL, "tokens": out["tokens"]}).json()["prompt"] == TEXT


@pytest.mark.parametrize("path,body,match", [
    ("/tokenize", {}, "send one of content"),
    ("/tokenize", {"content": "x", "prompt": "y"}, "got content, prompt"),
    ("/tokenize", {"prompt": 5}, "'prompt'"),
    ("/tokenize", {"model": "other", "prompt": "x"}, "does not exist"),
    ("/detokenize", {"tokens": [1, 40000]}, "ids of this model's vocabulary (0 to 32015)"),
    ("/detokenize", {"tokens": "abc"}, "'tokens'"),
])
def test_bad_requests_say_what_is_wrong(server, path, body, match):
    out = post(server[0], path, body)
    assert out.status_code == (404 if "model" in body else 400) and match in out.json()["error"]["message"], out.text
