"""`codellama self-instruct`: build instruction data the way the paper did (spec 4.6): questions, unit tests
and solutions written by models, kept where a solution passes its tests in the sandbox.

    codellama self-instruct --out si/ --question-model Llama-2-70b-chat-dir --model CodeLlama-7b-dir --rounds 1240
    codellama self-instruct --out si/ --rounds 4 --max-questions 20     # a small run on the default model

Writes si/instructions.jsonl, the chat data of `codellama train --recipe instruct` (instructions.jsonl under
its data root; the command prints how to train on it alone). Every stage resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from codellama.commands.eval import AS_BEFORE
from codellama.commands.generate import add_precision_args

TRAIN_ON_THEM_ALONE = 'data.sources=[{name="instructions", kind="chat", path="instructions.jsonl", weight=1.0}]'


def register(subparsers) -> None:
    p = subparsers.add_parser("self-instruct", help="generate tested instruction data (questions, tests, solutions)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (stages resume from what is there)")
    p.add_argument("--model", "-m", default=None, help="writes tests and solutions (the paper: Code Llama 7B; default: "
                   "the embedded model)")
    p.add_argument("--question-model", default=None, help="writes the questions (the paper: Llama 2 70B; default: --model)")
    p.add_argument("--rounds", type=int, default=20, help="question lists to ask for (default 20)")
    p.add_argument("--per-round", type=int, default=50, help="questions per list (default 50, as the paper)")
    p.add_argument("--max-questions", type=int, default=None, help="only the first N distinct questions go on")
    p.add_argument("--tests", type=int, default=5, help="unit tests per question (default 5)")
    p.add_argument("--solutions", type=int, default=10, help="solutions per question (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--workers", type=int, default=None, help="parallel sandboxed runs (default: CPU count)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per solution run (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decontam-dir", metavar="DIR", help="folder with MBPP (mbpp.jsonl) and MultiPL-E (humaneval-*.jsonl) "
                   "to decontaminate against, besides HumanEval (default $CODELLAMA_DATA_DIR)")
    p.add_argument("--no-decontam", dest="decontam", action="store_false", help="keep examples that overlap benchmarks")
    p.add_argument("--device", default=None)
    add_precision_args(p, quantize="none", why=AS_BEFORE)  # both models
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codellama.data.decontam import resolve_data_dir
    from codellama.data.self_instruct import SelfInstructConfig, run as run_stages
    from codellama.errors import UserError
    from codellama.eval.runner import ModelAdapter

    cfg = SelfInstructConfig(out=args.out, rounds=args.rounds, per_round=args.per_round, tests=args.tests,
                             solutions=args.solutions, max_questions=args.max_questions,
                             max_new_tokens=args.max_new_tokens, seed=args.seed, timeout=args.timeout,
                             workers=args.workers, decontam=args.decontam,
                             decontam_dir=resolve_data_dir(args.decontam_dir) if args.decontam else None,
                             progress=not args.no_progress and sys.stderr.isatty())
    if args.batch_size < 1:  # the model would have run one prompt at a time without a word
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    load = partial(ModelAdapter.load, device=args.device, batch_size=args.batch_size, dtype=args.dtype,
                   quantize=args.quantize)
    model = load(args.model)
    asker = load(args.question_model) if args.question_model else None
    counts = run_stages(cfg, model, asker)
    width = max(map(len, counts))
    print("\n".join(f"{k.replace('_', ' '):<{width}}  {v}" for k, v in counts.items()))
    print(f"{counts['kept']} conversations in {cfg.out / 'instructions.jsonl'}; to fine-tune on them alone:\n"
          f"  codellama train --recipe instruct --data-root {cfg.out} --set '{TRAIN_ON_THEM_ALONE}'\n"
          "(the recipe's default also rehearses code/ and text/ shards under the data root)", file=sys.stderr)
    return 0
