"""`codellama eval` end to end with the real default model (SmolLM2-135M) on a few HumanEval problems."""

from __future__ import annotations

import json

import pytest

import codellama
from codellama.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("instruct", [False, True])
def test_eval_cli_default_model(tmp_path, capsys, instruct):
    if not hasattr(codellama, "load"):
        pytest.skip("codellama.load (the generation API) is not in this build yet")
    out = tmp_path / "he"
    argv = ["eval", "--task", "humaneval", "--limit", "2", "--k", "1", "--out", str(out), "--max-new-tokens", "64",
            "--workers", "2"] + (["--instruct"] if instruct else [])
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "humaneval" in table and "pass@1" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems_scored"] == 2 and summary["samples_scored"] == 2
    assert 0.0 <= summary["pass@1"] <= 1.0 and summary.get("generation_samples_per_s", 0) > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    if not instruct:  # truncated at the paper's stop words
        assert not any(stop in s["completion"] for s in samples for stop in ("\ndef", "\nclass", "\nif", "\nprint", "\n#"))
    # the rerun resumes: nothing left to do, same numbers
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["pass@1"] == summary["pass@1"]


@pytest.mark.slow
def test_batched_chat_equals_one_by_one():
    if not hasattr(codellama, "load"):
        pytest.skip("codellama.load (the generation API) is not in this build yet")
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
    assert gsm8k["samples_scored"] == 2 and 0 <= gsm8k["pass@1"] <= 1
    assert bold["temperature"] == 0.1 and bold["top_p"] == 0.9 and -1 <= bold["sentiment"] <= 1
    assert refusal["samples_scored"] == 2 and refusal["refusal_percent"] in (0.0, 50.0, 100.0)
