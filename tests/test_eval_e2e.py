"""`codellama eval` end to end with the real default model (SmolLM2-135M) on a few HumanEval problems."""

from __future__ import annotations

import json

import pytest

import codellama
from codellama.cli import main
from codellama.eval.judges import is_refusal


@pytest.mark.slow
@pytest.mark.parametrize("instruct", [False, True])
def test_eval_cli_default_model(tmp_path, capsys, instruct):
    out = tmp_path / "he"
    argv = ["eval", "--task", "humaneval", "--limit", "2", "--k", "1", "--out", str(out), "--max-new-tokens", "64",
            "--workers", "2"] + (["--instruct"] if instruct else [])
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "humaneval" in table and "pass@1" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems_scored"] == 2 and summary["samples_scored"] == 2
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert summary["pass@1"] == sum(r["passed"] for r in results) / 2  # greedy: pass@1 is the share passed
    assert summary.get("generation_samples_per_s", 0) > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    if not instruct:  # truncated at the paper's stop words
        assert not any(stop in s["completion"] for s in samples for stop in ("\ndef", "\nclass", "\nif", "\nprint", "\n#"))
    # the rerun resumes: nothing left to do, same numbers
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["pass@1"] == summary["pass@1"]


@pytest.mark.slow
def test_batched_chat_equals_one_by_one():
    from codellama.eval.runner import ModelAdapter

    model = ModelAdapter(codellama.load(), batch_size=3)
    convs = [[{"role": "user", "content": q}] for q in ("Write a Python function that adds two numbers.",
                                                         "What is 2 + 2?", "Say hello in French.")]
    one_by_one = [model.chat(c, max_new_tokens=24, temperature=0.0) for c in convs]
    assert model.chat_many(convs, max_new_tokens=24, temperature=0.0) == one_by_one


@pytest.mark.slow
def test_maths_and_safety_tasks_with_the_default_model(tmp_path, capsys, shared_data):
    out = tmp_path / "s"
    argv = ["eval", "--task", "gsm8k,bold,false-refusal", "--limit", "2", "--data-dir", str(shared_data),
            "--max-new-tokens", "24", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sentiment" in printed and "% refused" in printed
    gsm8k, bold, refusal = (json.loads((out / t / "summary.json").read_text()) for t in ("gsm8k", "bold", "false-refusal"))
    # the summaries agree with the verdicts and texts on file (the model's answers themselves are unknown)
    def rows(task: str, name: str) -> list[dict]:
        return [json.loads(line) for line in (out / task / name).read_text().splitlines()]

    assert gsm8k["samples_scored"] == 2 and gsm8k["pass@1"] == sum(r["passed"] for r in rows("gsm8k", "results.jsonl")) / 2
    assert bold["temperature"] == 0.1 and bold["top_p"] == 0.9
    # the first two BOLD prompts are of two subgroups (interleaved), so the mean of subgroups is the plain mean
    assert bold["sentiment"] == pytest.approx(sum(r["sentiment"] for r in rows("bold", "results.jsonl")) / 2)
    answers = [r["completion"] for r in rows("false-refusal", "samples.jsonl")]
    assert refusal["samples_scored"] == 2
    assert refusal["refusal_percent"] == 100 * sum(map(is_refusal, answers)) / 2
