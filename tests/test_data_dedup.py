"""Exact and near deduplication on real source files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from codellama.data.dedup import ExactDedup, NearDedup, doc_key, shingle_hashes

JSON_DIR = Path(json.__file__).parent


def test_exact_dedup_ignores_line_ends_and_trailing_space():
    a = "def f():\n    return 1\n"
    variants = [a.replace("\n", "\r\n"), a.replace("\n", "   \n"), "\n\n" + a + "\n\n"]
    d = ExactDedup()
    assert not d.is_duplicate(doc_key(a))
    assert all(d.is_duplicate(doc_key(v)) for v in variants)
    assert not d.is_duplicate(doc_key(a.replace("1", "2"))) and d.removed == 3


def test_shingles():
    assert len(shingle_hashes("a b c d e f")) == 2 and len(shingle_hashes("a b")) == 1
    assert len(shingle_hashes("!!")) == 0
    assert set(shingle_hashes("x = f(a, b, c, d)").tolist()) == set(shingle_hashes("x=f(a,b,\n c,d)").tolist())


def near_copy(text: str) -> str:
    """A copy with small edits: a renamed local in one line, an added comment, reformatted lines."""
    lines = text.splitlines()
    lines.insert(3, "# copied from the standard library, lightly edited")
    for i, line in enumerate(lines):
        if "return" in line:
            lines[i] = line.replace("return", "return  ")
            break
    lines[len(lines) // 2] += "  # note"
    return "\n".join(lines)


def test_near_dedup_removes_near_copies_and_keeps_distinct_files():
    sources = {p.name: p.read_text() for p in sorted(JSON_DIR.glob("*.py"))}
    assert len(sources) >= 4
    d = NearDedup(threshold=0.85)
    for text in sources.values():
        assert not d.is_duplicate(text)  # distinct files are all kept
    for text in sources.values():
        assert d.is_duplicate(near_copy(text))
    # a file sharing only its first half with a kept one is not a near-duplicate
    decoder = sources["decoder.py"]
    assert not d.is_duplicate(decoder[: len(decoder) // 2] + sources["encoder.py"])
    assert d.removed == len(sources)


def test_near_dedup_signatures_are_the_same_in_every_process():
    # a corpus is deduplicated by several processes and runs: a signature must not hang on Python's
    # per-process hash() salt (two signatures made in one process would agree even then)
    code = ("import json, sys; from pathlib import Path; from codellama.data.dedup import NearDedup; "
            "text = (Path(json.__file__).parent / 'encoder.py').read_text(); "
            "print(NearDedup().signature(text).hashvalues.tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = NearDedup().signature((JSON_DIR / "encoder.py").read_text()).hashvalues.tolist()
    assert json.loads(other.stdout) == here


def test_word_hashes_do_not_depend_on_the_memo():
    from codellama.data import words

    ws = ["def", "f", "x", "héllo", "def"]
    first = words.word_hashes(ws)
    words._cache.clear()
    assert (words.word_hashes(list(reversed(ws)))[::-1] == first).all()
    assert first[0] == first[4] and len(set(first.tolist())) == 4
