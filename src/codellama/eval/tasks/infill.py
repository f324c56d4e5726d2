"""HumanEval infilling (Bavarian et al. 2022; Fried et al. 2023): fill the masked middle of a HumanEval
solution; pass@1 greedy in the paper (Tab. 14), in PSM and SPM prompt order (spec 2.3).

Tasks: humaneval-infill-{single-line,multi-line,random-span,random-span-light} (prefix-suffix-middle) and
the same names with `-spm` (suffix-prefix-middle). Program = prefix + middle + suffix + test + check, as
the upstream harness builds it. Data: human-eval-infilling/HumanEval-*Infilling*.jsonl.gz in --data-dir."""

from __future__ import annotations

from codellama.eval.data import data_file, read_jsonl
from codellama.eval.sandbox import Program
from codellama.eval.tasks.base import Task, python_program

FILES = {
    "single-line": "HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "HumanEval-RandomSpanInfillingLight.jsonl.gz",
}


class HumanEvalInfill(Task):
    mode = "infill"
    max_new_tokens = 256

    def __init__(self, variant: str, suffix_first: bool, data_dir=None):
        super().__init__(data_dir)
        self.variant = variant
        self.suffix_first = suffix_first
        self.name = f"humaneval-infill-{variant}" + ("-spm" if suffix_first else "")

    def load(self) -> list[dict]:
        path = data_file(self.data_dir, "human-eval-infilling", FILES[self.variant], self.name)
        return list(read_jsonl(path, ("task_id", "prompt", "suffix", "test", "entry_point")))

    def infill_parts(self, problem: dict) -> tuple[str, str]:
        return problem["prompt"], problem["suffix"]

    def postprocess(self, problem: dict, generation: str, instruct: bool = False) -> str:
        return generation  # the model stops at <EOT>

    def program(self, problem: dict, completion: str, instruct: bool = False) -> Program:
        code = f"{problem['prompt']}{completion}{problem['suffix']}\n{problem['test']}\ncheck({problem['entry_point']})\n"
        return python_program(code, self.limits)

    def reference(self, problem: dict) -> str:
        return problem["canonical_solution"]


def infill_tasks() -> dict:
    return {
        f"humaneval-infill-{v}" + ("-spm" if spm else ""): (lambda d=None, _v=v, _s=spm: HumanEvalInfill(_v, _s, d))
        for v in FILES for spm in (False, True)
    }
