"""Task registry: name -> factory(data_dir) -> Task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from codellama.errors import UserError
from codellama.eval.tasks.base import Task


def _registry() -> dict[str, Callable[..., Task]]:
    from codellama.eval.tasks.humaneval import HumanEval
    from codellama.eval.tasks.infill import infill_tasks
    from codellama.eval.tasks.mbpp import MBPP
    from codellama.eval.tasks.multipl_e import multipl_e_tasks

    return {"humaneval": HumanEval, "mbpp": MBPP, **multipl_e_tasks(), **infill_tasks()}


# tasks that do not run programs; the runner dispatches them to their own evaluate()
SPECIAL_TASKS = ("long-context-key-retrieval", "perplexity-vs-length")


def task_names() -> list[str]:
    return sorted(_registry()) + list(SPECIAL_TASKS)


def get_task(name: str, data_dir: str | Path | None = None) -> Task:
    reg = _registry()
    if name not in reg:
        close = [n for n in task_names() if name.split("-")[0] in n][:8]
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown task {name!r}{hint}; known tasks: {', '.join(task_names())}")
    return reg[name](data_dir)
