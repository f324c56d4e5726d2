"""HumanEval infilling: canonical middles pass, PSM/SPM variants exist, a model that cannot infill is
refused in one line before anything is generated."""

from __future__ import annotations

import pytest

from codellama.errors import UserError
from codellama.eval.runner import EvalConfig, ModelAdapter, generate
from codellama.eval.sandbox import Limits, Sandbox
from codellama.eval.tasks import get_task, task_names
from codellama.eval.tasks.infill import FILES


def _canonical_failures(task, problems):
    task.limits = Limits(timeout=10.0)
    with Sandbox(workers=2) as sb:
        out = dict(sb.map([task.program(p, task.reference(p)) for p in problems]))
        # a control: the middle is part of the program (a broken one fails)
        assert not sb.run(task.program(problems[0], "\n)(\n")).passed
    return [(problems[i]["task_id"], r.result) for i, r in out.items() if not r.passed]


def test_task_names():
    names = task_names()
    for v in FILES:
        assert f"humaneval-infill-{v}" in names and f"humaneval-infill-{v}-spm" in names


@pytest.mark.parametrize("variant", list(FILES))
def test_canonical_middles_pass_sample(shared_data, variant):
    task = get_task(f"humaneval-infill-{variant}", shared_data)
    problems = task.load()
    assert {p["task_id"].split("/")[0] for p in problems} == {FILES[variant].split("-")[1].split(".")[0]}
    assert _canonical_failures(task, problems[::len(problems) // 24][:24]) == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["single-line", "random-span-light"])
def test_canonical_middles_pass_all(shared_data, variant):
    task = get_task(f"humaneval-infill-{variant}", shared_data)
    assert _canonical_failures(task, task.load()) == []


class NoInfillGenerator:
    class tokenizer:  # noqa: N801 - a tokenizer without <PRE>/<SUF>/<MID>
        can_infill = False

    def infill(self, *a, **k):
        raise AssertionError("must not be called")


def test_model_that_cannot_infill_is_refused(shared_data, tmp_path):
    task = get_task("humaneval-infill-single-line-spm", shared_data)
    assert task.suffix_first
    cfg = EvalConfig(task=task.name, data_dir=str(shared_data), out=tmp_path, limit=2, progress=False)
    with pytest.raises(UserError, match="cannot infill"):
        generate(task, cfg, ModelAdapter(NoInfillGenerator()))
