"""Self-instruct: questions deduplicated, tests parsed, solutions run against them in the real sandbox, the
first passing one kept, in the chat form the instruct recipe trains on; every stage resumes.

The model is scripted (known questions, tests and right or wrong solutions), so these tests check the
pipeline without depending on a model's skill; the slow test runs the real default model end to end."""

from __future__ import annotations

import json

import pytest

from codellama.data.self_instruct import SelfInstructConfig, parse_tests, run, split_questions
from codellama.eval.runner import ModelAdapter

HUMANEVAL_0 = "Check if in given list of numbers, are any two numbers closer to each other than given threshold."
QUESTIONS = ["Write a function that returns the sum of a list of integers.",
             "Write a function that reverses a string.",
             "Write a function that tells whether a number is prime.",
             HUMANEVAL_0]  # a benchmark problem: decontamination drops it
FUNCTIONS = {  # question -> (tests answer, [solution of sample 0, 1, ...])
    QUESTIONS[0]: ("[TESTS]\nassert total([1, 2, 3]) == 6\nassert total([]) == 0\nassert True\nassert total(\n[/TESTS]",
                   ["def total(xs):\n    return 0", "def total(xs):\n    return sum(xs)"]),
    QUESTIONS[1]: ("Tests:\nassert rev('abc') == 'cba'\nassert rev('') == ''",
                   ["def rev(s):\n    return s[::-1]", "def rev(s):\n    return s"]),
    QUESTIONS[2]: ("[TESTS]\nassert is_prime(7)\nassert not is_prime(8)\n[/TESTS]",
                   ["def is_prime(n):\n    while True:\n        pass", "import os\nos._exit(0)\ndef is_prime(n):\n    return True"]),
    HUMANEVAL_0: ("[TESTS]\nassert has_close_elements([1.0, 2.0, 3.9, 4.0], 0.3)\n[/TESTS]",
                  ["def has_close_elements(numbers, threshold):\n    for idx, elem in enumerate(numbers):\n"
                   "        for idx2, elem2 in enumerate(numbers):\n            if idx != idx2:\n"
                   "                distance = abs(elem - elem2)\n                if distance < threshold:\n"
                   "                    return True\n    return False"] * 2),
}


class Scripted:
    """chat(): a question list, tests, or solution `sample` of the question, by which prompt it gets."""

    def __init__(self):
        self.tokenizer = None
        self.calls = 0
        self.sample: dict[str, int] = {}

    def chat(self, messages, **kw):
        self.calls += 1
        text = messages[-1]["content"]
        if text.startswith("Write ") and "interview questions" in text:
            return "Here you go:\n" + "\n".join(f"{i + 1}. {q}" for i, q in enumerate(QUESTIONS)) + \
                f"\n4. {QUESTIONS[1].upper()}\n5.   {QUESTIONS[0]}\n(hope this helps)"
        question = next(q for q in QUESTIONS if text.startswith(q))
        tests, solutions = FUNCTIONS[question]
        if "unit tests" in text:
            return tests
        i = self.sample.get(question, 0)
        self.sample[question] = i + 1
        return f"Sure.\n[PYTHON]\n{solutions[i % len(solutions)]}\n[/PYTHON]"


def test_parsing():
    assert split_questions("Intro:\n1. " + QUESTIONS[0] + "\n2) " + QUESTIONS[1] + "\n- short\n* " + QUESTIONS[2]) == QUESTIONS[:3]
    assert parse_tests(FUNCTIONS[QUESTIONS[0]][0]) == ["assert total([1, 2, 3]) == 6", "assert total([]) == 0"]
    assert parse_tests(FUNCTIONS[QUESTIONS[1]][0]) == ["assert rev('abc') == 'cba'", "assert rev('') == ''"]
    # tests that call only builtins pass any solution, an empty one too: they would keep a wrong solution
    assert parse_tests("assert abs(-1) == 1\nassert len('ab') == 2\nassert sorted([2, 1]) == [1, 2]\n"
                       "assert (lambda x: x)(1) == 1\nassert isinstance(rev('a'), str)\n"
                       "assert Stack().push(1).pop() == 1\nassert math.gcd(4, 6) == 2") == \
        ["assert isinstance(rev('a'), str)", "assert Stack().push(1).pop() == 1", "assert math.gcd(4, 6) == 2"]
    # an assert of a tuple (a message in the parentheses) is always true; more than one statement is not a test
    assert parse_tests("assert (total([1, 2]) == 3, 'sums')\n"
                       "assert total([1]) == 1; import os; os._exit(0)\nassert total([]) == 0, 'empty'") == \
        ["assert total([]) == 0, 'empty'"]


def test_pipeline_keeps_the_first_passing_solution_and_resumes(tmp_path, codellama):
    from codellama.train.data import ChatExamples

    gen = Scripted()
    cfg = SelfInstructConfig(out=tmp_path / "si", rounds=2, per_round=5, solutions=2, timeout=2.0, workers=2,
                             progress=False)
    counts = run(cfg, ModelAdapter(gen, batch_size=2))
    assert counts == {"question_lists": 2, "questions": 4, "with_tests": 4, "solutions": 8, "solutions_passed": 4,
                      "decontaminated": 1, "kept": 2}
    dropped = json.loads((cfg.out / "decontaminated.jsonl").read_text())
    assert dropped["id"] == "Q3" and dropped["item"] == "HumanEval/0"
    rows = [json.loads(line) for line in (cfg.out / "instructions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample_idx"]) for r in rows] == [("Q0", 1), ("Q1", 0)]  # prime: a loop, then a fake exit
    user, answer = rows[0]["messages"]
    assert user["content"].startswith(QUESTIONS[0]) and "assert total([1, 2, 3]) == 6" in user["content"]
    assert answer == {"role": "assistant", "content": "[PYTHON]\ndef total(xs):\n    return sum(xs)\n[/PYTHON]"}
    verdicts = {(v["id"], v["sample_idx"]): v["status"] for v in map(json.loads, (cfg.out / "verdicts.jsonl").open())}
    assert verdicts[("Q2", 0)] == "timed out" and verdicts[("Q2", 1)] == "failed"

    calls = gen.calls
    assert run(cfg, ModelAdapter(gen, batch_size=2)) == counts and gen.calls == calls  # nothing redone
    examples = ChatExamples.from_jsonl(cfg.out / "instructions.jsonl", codellama, seq_len=256)
    assert len(examples.convs) == 2  # the instruct recipe's chat reader takes it


class Interrupted(Scripted):
    """Records the seed of every solution asked for; raises KeyboardInterrupt at solution number `stop`."""

    def __init__(self, stop=None):
        super().__init__()
        self.seeds, self.stop = set(), stop

    def chat(self, messages, **kw):
        text = messages[-1]["content"]
        if "[PYTHON]" in text:
            if self.stop is not None and len(self.seeds) == self.stop:
                raise KeyboardInterrupt
            self.seeds.add((text.split("\n")[0], kw["seed"]))
        return super().chat(messages, **kw)


def test_a_resumed_run_samples_with_the_seeds_of_an_uninterrupted_one(tmp_path):
    def config(out):
        return SelfInstructConfig(out=out, rounds=1, solutions=3, timeout=2.0, workers=2, decontam=False,
                                  progress=False)

    whole = Interrupted()
    run(config(tmp_path / "a"), ModelAdapter(whole, batch_size=2))
    first, second = Interrupted(stop=5), Interrupted()
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "b"), ModelAdapter(first, batch_size=2))
    run(config(tmp_path / "b"), ModelAdapter(second, batch_size=2))
    assert len(whole.seeds) == 12 and first.seeds | second.seeds == whole.seeds


def test_the_printed_training_command_trains_on_the_output(tmp_path):
    from codellama.cli import main
    from codellama.commands.self_instruct import TRAIN_ON_THEM_ALONE

    cfg = SelfInstructConfig(out=tmp_path / "si", rounds=1, per_round=5, solutions=2, timeout=2.0, workers=2,
                             decontam=False, progress=False)
    assert run(cfg, ModelAdapter(Scripted(), batch_size=4))["kept"] == 3
    assert main(["train", "--recipe", "instruct", "--scale", "tiny", "--data-root", str(cfg.out), "--out",
                 str(tmp_path / "run"), "--set", TRAIN_ON_THEM_ALONE, "--set", "train.steps=1"]) == 0
    # the export chats in the format it was tuned on, also where the checkpoint's template is what counts
    from codellama.prompts import INSTRUCT_TEMPLATE

    config = json.loads((tmp_path / "run" / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == INSTRUCT_TEMPLATE


def test_bad_input_says_what_to_do(tmp_path):
    from codellama.errors import UserError

    class Mute(Scripted):
        def chat(self, messages, **kw):
            return "I like turtles."

    with pytest.raises(UserError, match="no questions could be read"):
        run(SelfInstructConfig(out=tmp_path / "si", rounds=1, progress=False), ModelAdapter(Mute(), batch_size=1))
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="is a file"):
        SelfInstructConfig(out=tmp_path / "afile")
    with pytest.raises(UserError, match="--out .*cannot create the folder"):  # was a NotADirectoryError traceback
        run(SelfInstructConfig(out=tmp_path / "afile" / "si", rounds=1, progress=False),
            ModelAdapter(Mute(), batch_size=1))
    # an --out folder holding another tool's tests.jsonl: was a KeyError traceback
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tests.jsonl").write_text('{"task_id": "x", "test": "assert f(1) == 1"}\n')
    with pytest.raises(UserError, match="tests.jsonl: row 1 is not one of self-instruct's"):
        run(SelfInstructConfig(out=tmp_path / "other", rounds=1, max_questions=1, solutions=1, decontam=False,
                               progress=False), ModelAdapter(Scripted(), batch_size=1))
    with pytest.raises(UserError, match="--solutions must be >= 1"):
        SelfInstructConfig(out=tmp_path / "si", solutions=0)
    # before any model loads (was: --max-questions 0 kept them all, -2 silently dropped two, --timeout 0
    # recorded every solution as timed out after the whole generation)
    for setting, flag in (({"max_questions": 0}, "--max-questions"), ({"max_questions": -2}, "--max-questions"),
                          ({"max_new_tokens": 0}, "--max-new-tokens"), ({"workers": 0}, "--workers"),
                          ({"timeout": 0.0}, "--timeout"), ({"timeout": float("nan")}, "--timeout"),
                          ({"timeout": float("inf")}, "--timeout")):  # nan, inf: were a traceback
        with pytest.raises(UserError, match=flag):
            SelfInstructConfig(out=tmp_path / "si", **setting)


def test_batch_size_zero_is_refused_before_loading(tmp_path, capsys):
    from codellama.cli import main

    # a model spec that does not exist: reaching the loader would say so instead
    assert main(["self-instruct", "--out", str(tmp_path / "si"), "--batch-size", "0", "-m", "no-such-model"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_end_to_end(tmp_path, capsys):
    from codellama.cli import main

    out = tmp_path / "si"
    assert main(["self-instruct", "--out", str(out), "--rounds", "1", "--per-round", "3", "--max-questions", "2",
                 "--solutions", "2", "--max-new-tokens", "48"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["question_lists"] == 1 and summary["kept"] <= summary["questions"] <= 2
    assert (out / "instructions.jsonl").exists() and "kept" in capsys.readouterr().out
