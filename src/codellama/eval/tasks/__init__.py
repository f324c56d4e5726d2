"""Task registry: name -> factory(data_dir) -> Task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from codellama.errors import UserError
from codellama.eval.tasks.base import Task


def _registry() -> dict[str, Callable[..., Task]]:
    from codellama.eval.tasks.bold import BOLD
    from codellama.eval.tasks.false_refusal import FalseRefusal
    from codellama.eval.tasks.gsm8k import GSM8K
    from codellama.eval.tasks.humaneval import HumanEval
    from codellama.eval.tasks.infill import infill_tasks
    from codellama.eval.tasks.mbpp import MBPP
    from codellama.eval.tasks.multipl_e import multipl_e_tasks
    from codellama.eval.tasks.toxigen import ToxiGen

    return {"humaneval": HumanEval, "mbpp": MBPP, **multipl_e_tasks(), **infill_tasks(), "gsm8k": GSM8K,
            "toxigen": ToxiGen, "bold": BOLD, "false-refusal": FalseRefusal}


# tasks that do not run programs; the runner dispatches them to their own evaluate()
SPECIAL_TASKS = ("long-context-key-retrieval", "perplexity-vs-length")


def task_names() -> list[str]:
    return sorted(_registry()) + list(SPECIAL_TASKS)


def get_task(name: str, data_dir: str | Path | None = None, options: dict | None = None) -> Task:
    reg = _registry()
    if name not in reg:
        close = [n for n in task_names() if name.split("-")[0] in n][:8]
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown task {name!r}{hint}; known tasks: {', '.join(task_names())}")
    task = reg[name](data_dir)
    task.options = dict(options or {})
    return task
