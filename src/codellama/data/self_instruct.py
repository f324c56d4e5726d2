"""Self-instruct data (spec 4.6, the paper's §2.5): programming questions, unit tests and solutions written
by models, kept only where a solution passes its tests when run.

The paper's recipe, which each stage here follows with any model this project loads:
1. questions: a large model (Llama 2 70B) is asked, many times, for 50 interview-style questions of easy and
   medium difficulty; the lists are split into questions and exact duplicates dropped (62,000 -> ~52,000);
2. tests: a code model (Code Llama 7B) writes unit tests for each question (5 asserts in [TESTS] tags);
3. solutions: the code model writes 10 Python solutions per question, shown the first test only;
4. verification: every solution runs against all of its question's tests in the sandbox
   (codellama.eval.sandbox); the first one that passes is kept, with its question and tests (~14,000).
Kept examples that share text with the evaluation sets (data/decontam.py: HumanEval, and MBPP and MultiPL-E
from a data folder) are then dropped, so that a model trained on them is still scored fairly.

The prompts are ours, to the same effect. Every stage appends to its own jsonl file in the output folder
and skips what is there, so an interrupted run resumes, and a stage can run on another machine (or with
another model: --question-model) than the next. The result, `instructions.jsonl`, holds one conversation
per kept question ({"messages": [user, assistant], "tests": [...]}) in the form the instruct recipe reads
(train/data.py: ChatExamples); the assistant answers with the solution between [PYTHON] tags, as Code
Llama - Instruct does (the paper's MBPP instruct prompt asks for them).
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from codellama.errors import UserError
from codellama.eval.data import append_jsonl, read_jsonl_tolerant, repair_tail
from codellama.eval.runner import progress_bar

QUESTIONS_PROMPT = (
    "Write {n} programming interview questions of easy and medium difficulty, each on a different topic. "
    "Each must be answerable with one self-contained Python function that uses only the standard library: "
    "say what the function receives and what it returns. Number the questions from 1 to {n}, one per line, "
    "with no answers and no other text."
)
TESTS_PROMPT = (
    "{question}\n\nWrite {n} unit tests for a Python function that solves this problem: each one an `assert` "
    "statement calling the function, on a line of its own. Put them between a [TESTS] tag and a [/TESTS] tag, "
    "and write nothing else."
)
SOLUTION_PROMPT = (
    "{question}\nYour code should pass this test:\n\n{test}\n"
    "Your code should start with a [PYTHON] tag and end with a [/PYTHON] tag."
)

SOLUTION_SEEDS = 1 << 20  # solutions draw from seeds past the question lists
# room for one numbered question line (a sentence or two) when a list of per_round is asked for
_TOKENS_PER_QUESTION = 40
_NUMBERED = re.compile(r"^\s*(?:\d+[.)]|[-*])\s+(.+?)\s*$")
_TESTS = re.compile(r"\[TESTS\](.*?)(?:\[/TESTS\]|\Z)", re.S)


@dataclass
class SelfInstructConfig:
    out: Path
    rounds: int = 20  # question lists asked for (the paper: ~1,240 lists of 50 for 62,000 questions)
    per_round: int = 50
    tests: int = 5
    solutions: int = 10
    max_questions: int | None = None  # only the first N distinct questions go on to tests and solutions
    question_temperature: float = 0.8  # the paper does not say; as for the solutions
    solution_temperature: float = 0.8  # diverse solutions (the paper's sampling for pass@10)
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    timeout: float = 5.0  # seconds per solution run
    workers: int | None = None
    decontam: bool = True  # drop kept examples that overlap HumanEval (and MBPP, MultiPL-E in decontam_dir)
    decontam_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file; give a folder (it is created if missing)")
        for name in ("rounds", "per_round", "tests", "solutions", "max_questions", "max_new_tokens", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # <= 0: every solution would be recorded as timed out, and resuming keeps verdicts; nan and inf were
        # a ValueError / OverflowError from the sandbox's CPU limit
        if not 0 < self.timeout < math.inf:
            raise UserError(f"--timeout must be a number of seconds > 0, got {self.timeout}")


# ----------------------------------------------------------------------------------------------- parsing
def split_questions(text: str) -> list[str]:
    """The items of a numbered (or bulleted) list, one per line; other lines are left out."""
    return [m.group(1) for line in text.splitlines() if (m := _NUMBERED.match(line)) and len(m.group(1)) >= 15]


def normalise(question: str) -> str:
    """The key of exact deduplication: case and spacing do not make a question new."""
    return " ".join(question.lower().split())


def parse_tests(text: str) -> list[str]:
    """The `assert` lines between [TESTS] tags (or of the whole answer without them) that are valid Python
    and call a function the solution defines: `assert lambda: 1`, `assert True` or `assert abs(-1) == 1` would
    pass any solution."""
    m = _TESTS.search(text)
    tests = []
    for line in (m.group(1) if m else text).splitlines():
        line = line.strip()
        if not line.startswith("assert ") or line in tests:
            continue
        try:
            tree = ast.parse(line)
        except SyntaxError:
            continue
        # one assert, not `assert (f(1) == 2, "msg")`: a tuple is always true, so it passes a wrong solution
        if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert) or isinstance(tree.body[0].test, ast.Tuple):
            continue
        if any(isinstance(node, ast.Call) and _calls_own(node.func) for node in ast.walk(tree)):
            tests.append(line)
    return tests


def _calls_own(func: ast.expr) -> bool:
    """Whether a call is to something the solution must define (or import): `assert len([1]) == 1` calls
    only a builtin, so it passes any solution, an empty one too."""
    while isinstance(func, (ast.Attribute, ast.Call, ast.Subscript)):
        func = func.value if not isinstance(func, ast.Call) else func.func
    return isinstance(func, ast.Name) and not hasattr(builtins, func.id)


# ------------------------------------------------------------------------------------------------ stages
# what each stage's rows hold: a file of the same name from elsewhere in --out was a KeyError traceback
_KEYS = {"question_lists.jsonl": ("round", "text"), "tests.jsonl": ("id", "tests"),
         "solutions.jsonl": ("id", "sample_idx", "code"), "verdicts.jsonl": ("id", "sample_idx", "passed")}


def _rows(path: Path) -> list[dict]:
    repair_tail(path)
    rows = read_jsonl_tolerant(path)
    keys = _KEYS.get(path.name, ())
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in keys):
            raise UserError(f"{path}: row {i + 1} is not one of self-instruct's (it needs {', '.join(keys)}): "
                            "give a fresh --out, or remove the file to redo its stage")
    return rows


def ask_questions(cfg: SelfInstructConfig, model) -> None:
    """Stage 1: `rounds` question lists into question_lists.jsonl ({"round", "text"})."""
    path = cfg.out / "question_lists.jsonl"
    done = {r["round"] for r in _rows(path)}
    todo = [r for r in range(cfg.rounds) if r not in done]
    bar = progress_bar(len(todo), "question lists", cfg.progress, "list")
    prompt = [{"role": "user", "content": QUESTIONS_PROMPT.format(n=cfg.per_round)}]
    max_new = max(cfg.max_new_tokens, _TOKENS_PER_QUESTION * cfg.per_round)
    for start in range(0, len(todo), model.batch_size):
        chunk = todo[start : start + model.batch_size]
        # the same prompt in every row, row j drawing from seed + j: list r gets seed + r, resumed or not
        texts = model.chat_many([prompt] * len(chunk), max_new_tokens=max_new,
                                temperature=cfg.question_temperature, top_p=cfg.top_p, seed=cfg.seed + chunk[0])
        append_jsonl(path, [{"round": r, "text": t} for r, t in zip(chunk, texts)])
        bar.update(len(chunk))
    bar.close()


def questions(cfg: SelfInstructConfig) -> list[dict]:
    """The distinct questions of all lists, in order of appearance: [{"id", "question"}]."""
    seen: set[str] = set()
    out = []
    for row in sorted(_rows(cfg.out / "question_lists.jsonl"), key=lambda r: r["round"]):
        for q in split_questions(row["text"]):
            key = normalise(q)
            if key not in seen:
                seen.add(key)
                out.append({"id": f"Q{len(out)}", "question": q})
    return out[: cfg.max_questions] if cfg.max_questions else out


def write_tests(cfg: SelfInstructConfig, model, qs: list[dict]) -> None:
    """Stage 2: unit tests per question into tests.jsonl ({"id", "tests", "generation"}), greedy."""
    path = cfg.out / "tests.jsonl"
    done = {r["id"] for r in _rows(path)}
    todo = [q for q in qs if q["id"] not in done]
    bar = progress_bar(len(todo), "tests", cfg.progress, "question")
    for start in range(0, len(todo), model.batch_size):
        chunk = todo[start : start + model.batch_size]
        convs = [[{"role": "user", "content": TESTS_PROMPT.format(question=q["question"], n=cfg.tests)}] for q in chunk]
        texts = model.chat_many(convs, max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        append_jsonl(path, [{"id": q["id"], "tests": parse_tests(t)[: cfg.tests], "generation": t}
                            for q, t in zip(chunk, texts)])
        bar.update(len(chunk))
    bar.close()


def solution_prompt(question: str, tests: list[str]) -> str:
    return SOLUTION_PROMPT.format(question=question, test=tests[0])


def write_solutions(cfg: SelfInstructConfig, model, qs: list[dict], tests: dict[str, list[str]]) -> None:
    """Stage 3: `solutions` samples per question with tests into solutions.jsonl ({"id", "sample_idx",
    "code", "generation"})."""
    from codellama.eval.tasks.base import extract_code

    path = cfg.out / "solutions.jsonl"
    done = {(r["id"], r["sample_idx"]) for r in _rows(path)}
    every = [(q, i) for q in qs if tests.get(q["id"]) for i in range(cfg.solutions)]
    todo = [(k, q, i) for k, (q, i) in enumerate(every) if (q["id"], i) not in done]
    bar = progress_bar(len(todo), "solutions", cfg.progress, "solution")
    for start in range(0, len(todo), model.batch_size):
        chunk = todo[start : start + model.batch_size]
        convs = [[{"role": "user", "content": solution_prompt(q["question"], tests[q["id"]])}] for _, q, _ in chunk]
        # row j draws from seed + j: sample k of the whole run gets its own seed, resumed or not
        texts = model.chat_many(convs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.solution_temperature,
                                top_p=cfg.top_p, seed=cfg.seed + SOLUTION_SEEDS + chunk[0][0])
        append_jsonl(path, [{"id": q["id"], "sample_idx": i, "code": extract_code(t), "generation": t}
                            for (_, q, i), t in zip(chunk, texts)])
        bar.update(len(chunk))
    bar.close()


def verify(cfg: SelfInstructConfig, tests: dict[str, list[str]], sandbox=None) -> None:
    """Stage 4: every solution against all its question's tests, into verdicts.jsonl ({"id", "sample_idx",
    "passed", "status"})."""
    from codellama.eval.sandbox import Limits, Sandbox
    from codellama.eval.tasks.base import python_program

    path = cfg.out / "verdicts.jsonl"
    done = {(r["id"], r["sample_idx"]) for r in _rows(path)}
    todo = [s for s in _rows(cfg.out / "solutions.jsonl") if (s["id"], s["sample_idx"]) not in done]
    if not todo:
        return
    limits = Limits(timeout=cfg.timeout)
    programs = [python_program(s["code"] + "\n\n" + "\n".join(tests[s["id"]]) + "\n", limits) for s in todo]
    own = sandbox is None
    sandbox = sandbox or Sandbox(workers=cfg.workers)
    bar = progress_bar(len(todo), "verify", cfg.progress, "solution")
    try:
        for i, r in sandbox.map(programs):
            append_jsonl(path, [{"id": todo[i]["id"], "sample_idx": todo[i]["sample_idx"], "passed": r.passed,
                                 "status": r.status}])
            bar.update(1)
    finally:
        bar.close()
        if own:
            sandbox.close()


def assemble(cfg: SelfInstructConfig, qs: list[dict], tests: dict[str, list[str]]) -> dict:
    """instructions.jsonl from the first passing solution of each question; returns the counts."""
    code = {(s["id"], s["sample_idx"]): s["code"] for s in _rows(cfg.out / "solutions.jsonl")}
    passing: dict[str, list[int]] = defaultdict(list)
    verdicts = _rows(cfg.out / "verdicts.jsonl")
    for v in verdicts:
        if v["passed"]:
            passing[v["id"]].append(v["sample_idx"])
    rows, dropped = [], []
    decontaminator = None
    if cfg.decontam:
        from codellama.data.decontam import build_decontaminator

        decontaminator = build_decontaminator(cfg.decontam_dir)
    for q in qs:
        if passing.get(q["id"]):
            first = min(passing[q["id"]])
            solution = code[(q["id"], first)].strip("\n")
            overlap = decontaminator.match(q["question"] + "\n" + solution) if decontaminator else None
            if overlap is not None:
                dropped.append({"id": q["id"], "benchmark": overlap.item.benchmark, "item": overlap.item.item,
                                "ngram": overlap.ngram})
                continue
            answer = "[PYTHON]\n" + solution + "\n[/PYTHON]"
            rows.append({"messages": [{"role": "user", "content": solution_prompt(q["question"], tests[q["id"]])},
                                      {"role": "assistant", "content": answer}],
                         "tests": tests[q["id"]], "id": q["id"], "sample_idx": first})
    (cfg.out / "instructions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")
    counts = {"question_lists": len(_rows(cfg.out / "question_lists.jsonl")), "questions": len(qs),
              "with_tests": sum(1 for q in qs if tests.get(q["id"])), "solutions": len(code),
              "solutions_passed": sum(1 for v in verdicts if v["passed"]), "decontaminated": len(dropped),
              "kept": len(rows)}
    (cfg.out / "decontaminated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dropped), encoding="utf-8")
    (cfg.out / "summary.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def run(cfg: SelfInstructConfig, model, question_model=None, sandbox=None) -> dict:
    """All stages; `model` writes tests and solutions, `question_model` (default: `model`) the questions.
    Models are eval.runner.ModelAdapter objects (loaded on first use, so finished stages load nothing)."""
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission: was a traceback
        raise UserError(f"--out {cfg.out}: cannot create the folder ({e.strerror or e})") from None
    ask_questions(cfg, question_model or model)
    qs = questions(cfg)
    if not qs:
        raise UserError(f"no questions could be read from the lists in {cfg.out / 'question_lists.jsonl'} "
                        "(a numbered list, one question per line, was asked for): try a larger --question-model")
    write_tests(cfg, model, qs)
    tests = {r["id"]: r["tests"] for r in _rows(cfg.out / "tests.jsonl")}
    write_solutions(cfg, model, qs, tests)
    verify(cfg, tests, sandbox)
    return assemble(cfg, qs, tests)
