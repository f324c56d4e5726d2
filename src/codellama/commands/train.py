"""`codellama train --recipe NAME|FILE`: run one stage of the Code Llama recipe (spec section 4).

On many GPUs or nodes run the same command under torchrun, e.g.
    torchrun --nproc_per_node 8 -m codellama train --recipe code --scale 7b --data-root /data/corpus
A run resumes from the latest checkpoint in its out_dir unless --no-resume.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with a recipe (code, python, lcft, instruct or a TOML file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", help="built-in recipe name (code, python, lcft, instruct) or a TOML file")
    p.add_argument("--scale", help="scale table of the recipe: tiny, smollm2 or 7b (default: the recipe's)")
    p.add_argument("--data-root", help="folder holding the recipe's data sources (overrides data.root)")
    p.add_argument("--init", help="checkpoint to start from (overrides model.init)")
    p.add_argument("--out", help="run directory for logs and checkpoints (overrides train.out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from step 0; an earlier run's checkpoints and logs there move to earlier-<time>/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the built-in recipes and exit")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from codellama.errors import UserError
    from codellama.train.config import builtin_recipes, load_recipe

    if args.list:
        print("\n".join(builtin_recipes()))
        return 0
    if not args.recipe:
        raise UserError("--recipe is required (one of " + ", ".join(builtin_recipes()) + ", or a TOML file)")
    overrides = list(args.set)
    for flag, key in ((args.data_root, "data.root"), (args.out, "train.out_dir"), (args.init, "model.init")):
        if flag:
            overrides.append(f"{key}={json.dumps(flag)}")
    recipe = load_recipe(args.recipe, scale=args.scale, overrides=overrides)
    if args.print_recipe:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0

    from codellama.train.distributed import close_distributed, exit_worker
    from codellama.train.trainer import Trainer

    trainer = Trainer(recipe, progress=not args.no_progress, resume=not args.no_resume)
    if trainer.resumed_from and trainer.env.is_main:  # a rerun after a crash should say where it picks up
        if trainer.step >= recipe.train.steps:  # said "(step 10 of 5)" and ended without a word on why
            print(f"{trainer.resumed_from} is at step {trainer.step}, train.steps is {recipe.train.steps}: nothing "
                  "left to train (a larger --set train.steps=N trains on)", file=sys.stderr)
        else:
            print(f"resuming from {trainer.resumed_from} (step {trainer.step} of {recipe.train.steps})",
                  file=sys.stderr)
    try:
        records = trainer.run()
    finally:
        trainer.close()
        close_distributed()
    code = _report(trainer, recipe, records)
    if trainer.env.distributed:
        exit_worker(code)
    return code


def _report(trainer, recipe, records: list[dict]) -> int:
    """Say how the run ended (the main rank); the exit status."""
    import sys

    if trainer.stopped_by is not None:
        if trainer.env.is_main:
            print(f"stopped by {trainer.stopped_by.name} at step {trainer.step} of {recipe.train.steps}, its "
                  f"checkpoint saved in {recipe.train.out_dir}; the same command resumes from it", file=sys.stderr)
        return 128 + trainer.stopped_by  # the shell's status for a process a signal ended
    if trainer.env.is_main:
        last = next((r for r in reversed(records) if r["kind"] == "train"), None)
        val = next((r for r in reversed(records) if r["kind"] == "valid"), None)
        summary = f"trained to step {trainer.step}"
        if last:
            summary += f", loss {last['loss']:.4f}"
        if val:
            summary += f", validation loss {val['loss']:.4f}"
        print(f"{summary}; run directory {recipe.train.out_dir}")
    return 0
