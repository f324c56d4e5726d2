"""`codellama <command>`: one console command, one module per subcommand.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func`.
Modules are imported only when listed here, so `codellama --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from pathlib import Path

from codellama.errors import UserError

# command name -> module that registers it
COMMANDS: dict[str, str] = {
    "complete": "codellama.commands.generate",
    "infill": "codellama.commands.generate",
    "chat": "codellama.commands.generate",
    "convert": "codellama.commands.convert",
    "info": "codellama.commands.info",
    "data": "codellama.commands.data",
    "self-instruct": "codellama.commands.self_instruct",
    "eval": "codellama.commands.eval",
    "eval-sweep": "codellama.commands.eval",
    "train": "codellama.commands.train",
    "serve": "codellama.commands.serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codellama",
        description="Code Llama end to end: run, infill, chat, serve, train and evaluate code models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in dict.fromkeys(COMMANDS.values()):  # each module once, in table order
        importlib.import_module(module_name).register(sub)
    return parser


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings speak to the user in one line, like our errors; other packages' keep their format."""
    if Path(filename).is_relative_to(Path(__file__).parent):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


# how long a torchrun worker other than local rank 0 waits before it says its UserError (_say_error)
PEER_ERROR_WAIT_S = 5.0


def _say_error(command: str, e: UserError) -> None:
    """Under torchrun every rank reads the same recipe and files, so usually all fail alike, and each printed the
    same line (8 on a node of 8). Local rank 0 says it; the others wait first, and torchrun ends them when local
    rank 0 exits. An error of theirs alone (local rank 0 carries on) is still said, after the wait."""
    if command == "train" and os.environ.get("LOCAL_RANK", "0") != "0":  # only train runs under torchrun
        time.sleep(PEER_ERROR_WAIT_S)
    print(f"codellama {command}: error: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UserError as e:
        _say_error(args.command, e)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `codellama info | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141  # what a shell reports for a process ended by SIGPIPE
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
