"""Evaluation harness: benchmarks scored the way the Code Llama paper did, with a real sandbox.

    from codellama.eval import EvalConfig, run
    summaries = run(EvalConfig(task="humaneval", model=None, out="eval-out/he"))

Modules: sandbox (run hostile programs), passk (unbiased pass@k), tasks/ (one module per benchmark, behind
a registry), judges (what scores text: a toxicity classifier, VADER sentiment, refusals), runner (resumable
generate/execute phases, summaries, temperature sweep), plots.
"""

from codellama.eval.passk import estimate, pass_at_k
from codellama.eval.runner import EvalConfig, ModelAdapter, run, run_task, sweep
from codellama.eval.sandbox import Limits, Program, RunResult, Sandbox, Step
from codellama.eval.tasks import get_task, task_names

__all__ = ["EvalConfig", "Limits", "ModelAdapter", "Program", "RunResult", "Sandbox", "Step", "estimate",
           "get_task", "pass_at_k", "run", "run_task", "sweep", "task_names"]
