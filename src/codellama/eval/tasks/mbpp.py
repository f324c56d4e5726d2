"""MBPP (Austin et al. 2021), as the Code Llama paper runs it: 3-shot with the original paper's prompt
(examples: task ids 2, 3, 4 of the prompt split), tests shown, evaluated on the test split (ids 11-510).
Format, from google-research/mbpp/README.md:
  You are an expert Python programmer, and here is your task: {text} Your code should pass these
  tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]
The model continues after the final "[BEGIN]\\n"; the completion ends at "[DONE]".
Instruct mode (zero-shot, modelled on the paper's Fig. 13): the task and tests, code asked between
[PYTHON] and [/PYTHON] tags."""

from __future__ import annotations

from codellama.errors import UserError
from codellama.eval.data import data_file, read_jsonl
from codellama.eval.sandbox import Program
from codellama.eval.tasks.base import Task, python_program

SHOT_IDS = (2, 3, 4)
TEST_IDS = range(11, 511)
STOP = ("[DONE]",)


def _tests(problem: dict) -> str:
    return "\n".join(problem["test_list"])


def _code(problem: dict) -> str:
    return problem["code"].replace("\r\n", "\n").strip()


def _block(problem: dict) -> str:
    return (
        f"You are an expert Python programmer, and here is your task: {problem['text']} "
        f"Your code should pass these tests:\n\n{_tests(problem)}\n[BEGIN]\n"
    )


class MBPP(Task):
    name = "mbpp"
    stop = STOP
    supports_instruct = True
    max_new_tokens = 512

    def __init__(self, data_dir=None):
        super().__init__(data_dir)
        self._shots: str | None = None

    def _rows(self) -> dict[int, dict]:
        path = data_file(self.data_dir, "mbpp", "mbpp.jsonl", self.name)
        return {row["task_id"]: row for row in read_jsonl(path, ("task_id", "text", "code", "test_list"))}

    def load(self) -> list[dict]:
        rows = self._rows()
        missing = [i for i in SHOT_IDS if i not in rows]
        if missing:  # the 3-shot prompt's examples: a KeyError traceback without them
            raise UserError(f"mbpp.jsonl lacks task ids {', '.join(map(str, missing))}, the examples of the "
                            "3-shot prompt: give the full mbpp.jsonl (all 974 problems)")
        self._shots = "".join(f"{_block(rows[i])}{_code(rows[i])}\n[DONE]\n" for i in SHOT_IDS)
        return [dict(rows[i], task_id=f"MBPP/{i}") for i in TEST_IDS if i in rows]

    def prompt(self, problem: dict) -> str:
        if self._shots is None:
            self.load()
        return self._shots + _block(problem)

    def chat_messages(self, problem: dict) -> list[dict]:
        content = (
            f"{problem['text']}\nYour code should pass these tests:\n\n{_tests(problem)}\n"
            "Your code should start with a [PYTHON] tag and end with a [/PYTHON] tag."
        )
        return [{"role": "user", "content": content}]

    def program(self, problem: dict, completion: str, instruct: bool = False) -> Program:
        setup = problem.get("test_setup_code") or ""
        code = f"{completion}\n{setup}\n{_tests(problem)}\n"
        return python_program(code, self.limits)

    def reference(self, problem: dict) -> str:
        return _code(problem)
