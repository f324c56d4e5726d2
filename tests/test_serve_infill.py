"""llama.cpp's /infill on the real server: the body llama.vscode sends, its layout of the prompt, the cut of a
long input, n_indent and t_max_predict_ms, and llama.cpp's answer fields."""

from __future__ import annotations

import json

import httpx
import pytest

from codellama.prompts import infill_tokens
from codellama.serve.llamacpp import SNIPPET_SEPARATOR, InfillRequest, Release, indent_cut, infill_ids
from serve_helpers import MODEL, running_server, tiny_model, tokenizer

PREFIX = "import os\n\n\ndef size(path):\n    total = 0\n"
LINE = "    for name in "  # the cursor's line up to the cursor: llama.vscode's `prompt`
SUFFIX = "\n    return total\n"
SNIPPETS = [{"filename": "util.py", "text": "def walk(p):\n    return os.walk(p)\n"}, {"text": "X = 1\n"}]


def llama_vscode_body(**over) -> dict:
    """What llama.vscode posts for a completion (src/llama-server.ts), made greedy for the comparisons."""
    return {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": SNIPPETS, "prompt": LINE, "n_predict": 8,
            "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "temperature": 0, **over}


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    with running_server(tiny_model(), tok, max_batch=2) as (url, engine):
        yield url


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + "/infill", json=body, timeout=60, **kw)


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
def test_the_prompt_is_the_models_infilling_format_with_the_snippets_and_the_line_in_the_prefix(tok, suffix_first):
    body = InfillRequest.model_validate(llama_vscode_body())
    ids, truncated = infill_ids(tok, body, 4096, suffix_first)
    prefix = SNIPPET_SEPARATOR + SNIPPETS[0]["text"] + SNIPPET_SEPARATOR + SNIPPETS[1]["text"] + PREFIX + LINE
    assert ids == infill_tokens(tok, prefix, SUFFIX, suffix_first=suffix_first) and not truncated


def test_a_long_input_loses_the_prefixs_start_and_the_suffixs_end(tok):
    body = InfillRequest.model_validate(llama_vscode_body(input_prefix=PREFIX * 40, input_suffix=SUFFIX * 40))
    whole, _ = infill_ids(tok, body, 10_000, False)
    ids, truncated = infill_ids(tok, body, 200, False)
    assert truncated and len(ids) == 200 < len(whole)
    pre, suf, mid = ids.index(tok.prefix_id), ids.index(tok.suffix_id), ids.index(tok.middle_id)
    prefix, suffix = ids[pre + 1:suf], ids[suf + 1:mid]
    assert len(suffix) == (200 - 4) // 4  # the suffix keeps a quarter of the room when the prefix needs the rest
    assert whole[whole.index(tok.suffix_id) - len(prefix):whole.index(tok.suffix_id)] == prefix  # its end: the cursor
    assert whole[whole.index(tok.suffix_id) + 1:][:len(suffix)] == suffix  # the suffix's start
    short = InfillRequest.model_validate(llama_vscode_body(input_prefix=PREFIX * 40, input_suffix="\n"))
    ids, _ = infill_ids(tok, short, 200, False)
    assert len(ids) == 200  # a short suffix leaves its room to the prefix


def test_n_indent_cuts_at_the_first_later_line_less_indented():
    assert indent_cut("x = 1\n    y = 2\n  z", 4) == len("x = 1\n    y = 2\n  ")
    assert indent_cut("x\n    y\n  ", 4) is None  # the last line's indentation is not known yet
    assert indent_cut("x\n\n", 1) == 2  # an empty line is less indented (as llama.cpp has it)
    assert indent_cut("  x\n    y", 4) is None and indent_cut("x\ny", 0) is None  # the first line is never cut
    release = Release(4)
    pieces = [release.add(d) for d in ["for a", " in b:\n", "  ", "      c\n", "  ", "d\n"]]
    # a line waits until its indentation is known; the cut keeps the cut line's indentation, as llama.cpp's does
    assert pieces == ["for a", " in b:\n", "", "        c\n", "", "  "]
    assert release.cut and release.text == "for a in b:\n        c\n  "


def test_llama_vscodes_request_gets_the_greedy_middle_and_llama_cpps_fields(server, tok):
    from codellama.generate import Generator
    from codellama.sampling import SamplingParams

    out = post(server, llama_vscode_body())
    assert out.status_code == 200, out.text
    answer = out.json()
    body = InfillRequest.model_validate(llama_vscode_body())
    ids, _ = infill_ids(tok, body, 4096, False)
    ref = Generator(tiny_model(), tok).generate(
        [ids], SamplingParams(max_new_tokens=8, stop_ids=tuple(tok.stop_ids | {tok.eot_id})),
        decode=tok.decode_infilling)[0]
    assert answer["content"] == ref.text and answer["tokens_predicted"] == len(ref.tokens)
    assert answer["tokens_evaluated"] == len(ids) and answer["stop"] is True and answer["model"] == MODEL
    assert answer["stop_type"] == ("limit" if ref.finish_reason == "length" else "eos")
    assert answer["truncated"] is False and answer["has_new_line"] == ("\n" in ref.text)
    assert answer["timings"]["prompt_n"] == len(ids) and answer["timings"]["predicted_n"] == len(ref.tokens)
    # llama.vscode's warm-up: n_predict 0 prefills the prompt, so the next request finds it cached
    warm = post(server, llama_vscode_body(prompt="", n_predict=0)).json()
    assert warm["content"] == "" and warm["tokens_predicted"] == 0
    again = post(server, llama_vscode_body(prompt="", n_predict=2)).json()
    assert again["tokens_cached"] >= again["tokens_evaluated"] - 1


def test_response_fields_pick_the_paths_asked_for(server):
    fields = ["content", "timings/prompt_n", "timings/missing", "truncated"]
    answer = post(server, llama_vscode_body(response_fields=fields)).json()
    assert set(answer) == {"content", "timings/prompt_n", "truncated"}


def newline_id(tok) -> int:
    return tok.piece_to_id("<0x0A>")


def test_n_indent_ends_the_generation_and_the_stream_sends_the_same_text(server, tok):
    # a bias makes every token a newline: the second line is empty, so less indented than 1
    body = llama_vscode_body(n_predict=40, n_indent=1, logit_bias=[[newline_id(tok), 100]], t_max_predict_ms=0)
    answer = post(server, body).json()
    assert answer["content"] == "\n" and answer["stop_type"] == "limit" and answer["tokens_predicted"] < 40
    with httpx.stream("POST", server + "/infill", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == "\n"
    assert [e["stop"] for e in events][-1] is True and events[-1]["stop_type"] == "limit"


def test_t_max_predict_ms_ends_the_generation_after_a_newline(server, tok):
    body = llama_vscode_body(n_predict=300, t_max_predict_ms=1, logit_bias={str(newline_id(tok)): 100})
    answer = post(server, body).json()
    assert answer["stop_type"] == "limit" and 0 < answer["tokens_predicted"] < 300
    assert set(answer["content"]) == {"\n"}


@pytest.mark.parametrize("body,match", [
    ({"n_predict": 10**6}, "n_predict is 1000000, more than this server allows"),
    ({"input_extra": [{"text": 5}]}, "'input_extra.0.text'"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": [[40000, 1]]}, "logit_bias has token id 40000, outside the model's vocabulary"),
    # a pair without its bias: was "'logit_bias' is required", of a field the body has
    ({"logit_bias": [[13]]}, "Invalid value for 'logit_bias': expected list[tuple[int,"),
    ({"stop": [""]}, "stop sequences must be non-empty"),
    ({"grammar": "root ::= x"}, "grammar (constrained decoding"),
    ({"model": "other"}, "does not exist"),
])
def test_bad_infill_requests_are_4xx_naming_what_is_wrong(server, body, match):
    out = post(server, {**llama_vscode_body(), **body})
    assert 400 <= out.status_code < 500 and match in out.json()["error"]["message"], out.text


def test_a_model_without_infill_tokens_says_so(tok):
    with running_server(tiny_model(), tokenizer("python"), max_batch=1) as (url, _):
        out = post(url, llama_vscode_body())
    assert out.status_code == 400 and "no infilling tokens" in out.json()["error"]["message"]
