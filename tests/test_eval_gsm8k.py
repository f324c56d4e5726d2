"""GSM8K: the few-shot prompt, answer extraction, and scoring through the runner (resumable phases)."""

from __future__ import annotations

import json

import pytest

from codellama.eval.runner import EvalConfig, ModelAdapter, run_task
from codellama.eval.tasks import get_task
from codellama.eval.tasks.gsm8k import SHOTS, expected, extract_answer


@pytest.fixture(scope="module")
def task(shared_data):
    return get_task("gsm8k", shared_data)


def test_every_reference_solution_scores(task):
    problems = task.load()
    assert len(problems) == 1319
    rows = task.score_texts([(p, task.reference(p)) for p in problems])
    assert all(r["passed"] for r in rows), [r["result"] for r in rows if not r["passed"]][:5]
    assert expected(problems[0]) == 18  # "Janet's ducks"


def test_prompt_is_eight_clean_shots_then_the_question(task):
    p = task.load()[5]
    prompt = task.prompt(p)
    assert prompt.count("Question: ") == SHOTS + 1 and prompt.count("\n#### ") == SHOTS
    assert "<<" not in prompt and prompt.endswith(f"Question: {p['question']}\nAnswer:")


@pytest.mark.parametrize("text, value", [
    (" 4 + 5 = 9\n#### 9", 9),
    (" so 2,125 in all.\n#### 2,125", 2125),
    (" #### 12 then #### -3", -3),  # the last final answer
    (" #### $1,200.50", 1200.5),
    (" She pays 3 dollars, then 4.5 more: 7.5", 7.5),  # no ####: the last number
    (" I do not know.", None),
    (" ####", None),
])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


class Arithmetic:
    """complete(): the right final answer for even-numbered problems, a wrong one for odd, then the next
    question (which the stop sequence must cut off)."""

    def __init__(self, problems):
        self.by_question = {p["question"]: p for p in problems}
        self.calls = 0

    def complete(self, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=(), seed=None):
        self.calls += len(prompts)
        out = []
        for prompt in prompts:
            p = self.by_question[prompt.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")]
            n = int(p["task_id"].split("/")[1])
            value = expected(p) + (n % 2)
            out.append(f" Some steps.\n#### {value:g}\n\nQuestion: how many? #### {expected(p):g}")
        return out


def test_runner_scores_and_resumes(task, shared_data, tmp_path):
    gen = Arithmetic(task.load())
    cfg = EvalConfig(task="gsm8k", data_dir=str(shared_data), out=tmp_path / "g", limit=6, k=(1,), progress=False)
    s = run_task(cfg, ModelAdapter(gen, 4))
    assert s["pass@1"] == pytest.approx(0.5) and s["status_counts"] == {"passed": 3, "failed": 3}
    samples = [json.loads(line) for line in (cfg.out / "samples.jsonl").read_text().splitlines()]
    assert all("Question" not in r["completion"] for r in samples)
    results = [json.loads(line) for line in (cfg.out / "results.jsonl").read_text().splitlines()]
    assert results[1]["result"].startswith("answer ") and not results[1]["passed"]
    assert run_task(cfg, ModelAdapter(gen, 4))["pass@1"] == s["pass@1"] and gen.calls == 6
