"""GSM8K (Cobbe et al. 2021): grade-school maths word problems, scored by the final number (solve rate =
greedy pass@1). The paper reports it for Code Llama (App. D, Tab. 12) without its prompting protocol; this
is the common few-shot chain of thought: the first 8 problems of the train split with their worked
solutions (calculator annotations `<<...>>` removed), each ending in the dataset's own `#### N` line, then

    Question: {question}
    Answer:

The model writes its reasoning and `#### N`; the completion ends at the next "Question:". Its answer is the
number after the last `####`, else the last number it wrote. Instruct mode asks the same in the chat format.
Data: gsm8k/test.jsonl and gsm8k/train.jsonl in --data-dir (the 1,319 test problems are scored)."""

from __future__ import annotations

import re

from codellama.errors import UserError
from codellama.eval.data import data_file, read_jsonl
from codellama.eval.tasks.base import Task

SHOTS = 8
FIELDS = ("question", "answer")
STOP = ("\n\nQuestion:", "\nQuestion:")
_ANNOTATION = re.compile(r"<<[^>]*>>")
_NUMBER = r"-?[\d,]*\.?\d+"
_FINAL = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)

INSTRUCT = "{question}\nSolve it step by step, and end your answer with a line of the form \"#### <number>\"."


def clean_solution(answer: str) -> str:
    """A train/test answer without its calculator annotations (`48/2 = <<48/2=24>>24` -> `48/2 = 24`)."""
    return _ANNOTATION.sub("", answer)


def expected(problem: dict) -> float:
    """The reference answer: the number of the dataset's `#### N` line."""
    return _number(_FINAL.findall(problem["answer"])[-1])


def _number(text: str) -> float:
    """A match of _NUMBER as a float: without its commas it always parses (digits, at most one point)."""
    return float(text.replace(",", ""))


def extract_answer(completion: str) -> float | None:
    """The number after the last `####`, else the last number of the text; None when there is none."""
    for found in (_FINAL.findall(completion), _ANY.findall(completion)):
        if found:
            return _number(found[-1])
    return None


class GSM8K(Task):
    name = "gsm8k"
    scoring = "text"
    stop = STOP
    supports_instruct = True
    max_new_tokens = 256

    def __init__(self, data_dir=None):
        super().__init__(data_dir)
        self._shots: str | None = None

    def load(self) -> list[dict]:
        train = read_jsonl(data_file(self.data_dir, "gsm8k", "train.jsonl", self.name), FIELDS)
        self._shots = "".join(f"Question: {row['question']}\nAnswer: {clean_solution(row['answer'])}\n\n"
                              for row, _ in zip(train, range(SHOTS)))
        path = data_file(self.data_dir, "gsm8k", "test.jsonl", self.name)
        test = [dict(row, task_id=f"GSM8K/{i}") for i, row in enumerate(read_jsonl(path, FIELDS))]
        for i, row in enumerate(test):  # scored against it: an IndexError traceback in the judging phase
            if not _FINAL.search(str(row["answer"])):
                raise UserError(f"{path}: problem {i} has no final `#### N` line in its answer; give the "
                                "original GSM8K test.jsonl")
        return test

    def prompt(self, problem: dict) -> str:
        if self._shots is None:
            self.load()
        return f"{self._shots}Question: {problem['question']}\nAnswer:"

    def chat_messages(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": INSTRUCT.format(question=problem["question"])}]

    def postprocess(self, problem: dict, generation: str, instruct: bool = False) -> str:
        return generation if instruct else super().postprocess(problem, generation)

    def score_texts(self, items: list[tuple[dict, str]]) -> list[dict]:
        rows = []
        for problem, completion in items:
            got, want = extract_answer(completion), expected(problem)
            passed = got is not None and abs(got - want) < 1e-6
            rows.append({"passed": passed, "status": "passed" if passed else "failed",
                         "result": f"answer {got:.12g}, expected {want:.12g}" if got is not None else "no number in the answer"})
        return rows

    def reference(self, problem: dict) -> str:
        return " " + clean_solution(problem["answer"])
