"""Benchmark files: locating the data folder, reading/writing jsonl (plain or .gz)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from codellama.errors import UserError

DATA_ENV = "CODELLAMA_DATA_DIR"


def data_root(data_dir: str | Path | None, subdir: str, task: str) -> Path:
    """The data folder (data_dir, else $CODELLAMA_DATA_DIR), which must exist."""
    root = data_dir or os.environ.get(DATA_ENV)
    if not root:
        raise UserError(
            f"task {task} needs its data in {subdir}/: pass --data-dir DIR (the folder holding {subdir}/) or set {DATA_ENV}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist (from --data-dir or {DATA_ENV}); point it at the folder holding {subdir}/")
    return root


def data_file(data_dir: str | Path | None, subdir: str, name: str, task: str) -> Path:
    """Find `<data_dir>/<subdir>/<name>` (or `<data_dir>/<name>`); data_dir defaults to $CODELLAMA_DATA_DIR."""
    root = data_root(data_dir, subdir, task)
    for cand in (root / subdir / name, root / name):
        if cand.is_file():
            return cand
    raise UserError(f"task {task}: {root / subdir / name} not found; point --data-dir at the folder holding {subdir}/")


def data_files(data_dir: str | Path | None, subdir: str, pattern: str, task: str) -> list[Path]:
    """The files matching `pattern` in `<data_dir>/<subdir>/`, sorted; at least one."""
    folder = data_root(data_dir, subdir, task) / subdir
    files = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if not files:
        raise UserError(f"task {task}: no {pattern} files in {folder}; point --data-dir at the folder holding {subdir.split('/')[0]}/")
    return files


def read_jsonl(path: str | Path, fields: tuple[str, ...] = ()) -> Iterator[dict]:
    """Rows of a .jsonl or .jsonl.gz file; a malformed line, or a row without one of `fields` (a benchmark
    file of another format, which failed later with a KeyError traceback), is a UserError naming file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not JSON
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per line") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
                missing = [k for k in fields if k not in row]
                if missing:
                    raise UserError(f"{path}:{lineno}: no {', '.join(missing)} field in the row; expected rows with "
                                    f"{', '.join(fields)}: is it the benchmark's original file?")
                yield row
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows and flush, so an interrupted run keeps everything written so far."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()


def read_jsonl_tolerant(path: str | Path) -> list[dict]:
    """Rows of our own output file; a torn last line (the run was killed mid-write) is dropped."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a --samples file may come with a byte-order mark
    except UnicodeDecodeError as e:  # a --samples file named samples.jsonl, saved in another encoding
        raise UserError(f"cannot read {p}: {e}; save it as UTF-8") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{p}:{i + 1}: not valid JSON; remove the line or the file to start over") from None
    return rows


def repair_tail(path: str | Path) -> None:
    """Drop a torn last line (no trailing newline: the run was killed mid-write) before appending."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return
    data = p.read_bytes()
    if not data.endswith(b"\n"):
        p.write_bytes(data[: data.rfind(b"\n") + 1])
