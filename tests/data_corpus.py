"""Real code for the data-pipeline tests: the top-level functions and classes of a few standard-library
modules, about a hundred documents from tens to thousands of tokens."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import shlex
import string
import textwrap
from pathlib import Path


def top_level_blocks(path: str) -> list[str]:
    """The top-level functions and classes of a Python file, each with its decorators."""
    text = Path(path).read_text()
    lines = text.splitlines(keepends=True)
    nodes = [n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return ["".join(lines[min([n.lineno, *(d.lineno for d in n.decorator_list)]) - 1 : n.end_lineno]) for n in nodes]


def real_code_blocks() -> list[str]:
    return [b for m in (textwrap, shlex, argparse, difflib, string, dataclasses) for b in top_level_blocks(m.__file__)]
