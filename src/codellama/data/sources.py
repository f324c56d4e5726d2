"""Where documents come from: local folders, git repositories, installed Python packages, jsonl files.

Every source is a lazy stream of `Document`s (one file or one jsonl record at a time). Files are read
as bytes and decoded later by the filters, which count binary and invalid UTF-8 files; a file over
`max_bytes` is not read at all (its Document has data=None and only its size). The language comes from
the file name (LANGUAGES); files of unknown type are skipped and counted in `SourceStats`.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from codellama.errors import UserError

# extension -> language: the MultiPL-E languages (cpp cs d go java jl js lua php pl r rb rkt rs scala sh
# swift ts) plus Python and other common code, markup and config files
LANGUAGES: dict[str, str] = {
    **dict.fromkeys(["py", "pyi", "pyx", "pxd"], "python"),
    **dict.fromkeys(["cpp", "cc", "cxx", "c++", "hpp", "hh", "hxx", "h++", "ipp", "tpp"], "cpp"),
    **dict.fromkeys(["c", "h"], "c"),
    "cs": "csharp",
    **dict.fromkeys(["d", "di"], "d"),
    "go": "go",
    "java": "java",
    "jl": "julia",
    **dict.fromkeys(["js", "mjs", "cjs", "jsx"], "javascript"),
    **dict.fromkeys(["ts", "mts", "cts", "tsx"], "typescript"),
    "lua": "lua",
    **dict.fromkeys(["php", "phtml"], "php"),
    **dict.fromkeys(["pl", "pm", "t"], "perl"),
    "r": "r",
    **dict.fromkeys(["rb", "rake", "gemspec"], "ruby"),
    "rkt": "racket",
    "rs": "rust",
    **dict.fromkeys(["scala", "sc"], "scala"),
    **dict.fromkeys(["sh", "bash", "zsh", "ksh"], "shell"),
    "swift": "swift",
    **dict.fromkeys(["kt", "kts"], "kotlin"),
    **dict.fromkeys(["m", "mm"], "objective-c"),
    "dart": "dart",
    **dict.fromkeys(["hs", "lhs"], "haskell"),
    **dict.fromkeys(["ml", "mli"], "ocaml"),
    **dict.fromkeys(["fs", "fsi", "fsx"], "fsharp"),
    **dict.fromkeys(["ex", "exs"], "elixir"),
    **dict.fromkeys(["erl", "hrl"], "erlang"),
    **dict.fromkeys(["clj", "cljs", "cljc", "edn"], "clojure"),
    **dict.fromkeys(["lisp", "lsp", "el"], "lisp"),
    **dict.fromkeys(["scm", "ss"], "scheme"),
    **dict.fromkeys(["groovy", "gradle"], "groovy"),
    **dict.fromkeys(["f", "f90", "f95", "f03", "for"], "fortran"),
    "zig": "zig",
    "nim": "nim",
    "v": "verilog",
    **dict.fromkeys(["sv", "svh"], "systemverilog"),
    **dict.fromkeys(["vhd", "vhdl"], "vhdl"),
    "cu": "cuda",
    **dict.fromkeys(["cl", "glsl", "hlsl", "wgsl"], "shader"),
    **dict.fromkeys(["ps1", "psm1"], "powershell"),
    **dict.fromkeys(["bat", "cmd"], "batch"),
    "sql": "sql",
    **dict.fromkeys(["html", "htm", "xhtml"], "html"),
    **dict.fromkeys(["css", "scss", "sass", "less"], "css"),
    "vue": "vue",
    "svelte": "svelte",
    **dict.fromkeys(["xml", "xsd", "xsl"], "xml"),
    **dict.fromkeys(["json", "jsonc"], "json"),
    **dict.fromkeys(["yaml", "yml"], "yaml"),
    "toml": "toml",
    **dict.fromkeys(["ini", "cfg", "conf"], "ini"),
    **dict.fromkeys(["md", "markdown"], "markdown"),
    "rst": "restructuredtext",
    "tex": "tex",
    "txt": "text",
    "ipynb": "jupyter",
    "cmake": "cmake",
    "proto": "protobuf",
    "mk": "makefile",
    "asm": "assembly",
    "s": "assembly",
    "sol": "solidity",
    "tf": "hcl",
    "elm": "elm",
    "purs": "purescript",
    "cr": "crystal",
    "coffee": "coffeescript",
    "pas": "pascal",
    "adb": "ada",
    "ads": "ada",
    "cob": "cobol",
    "vb": "visualbasic",
    "prolog": "prolog",
    "awk": "awk",
    "tcl": "tcl",
}
# whole file names with no telling extension
FILENAMES: dict[str, str] = {
    "makefile": "makefile",
    "gnumakefile": "makefile",
    "dockerfile": "dockerfile",
    "cmakelists.txt": "cmake",
    "rakefile": "ruby",
    "gemfile": "ruby",
    "jenkinsfile": "groovy",
    "build": "starlark",
    "workspace": "starlark",
    "readme": "text",
}
# directories never worth reading in a folder walk (git sources use git's own rules instead)
SKIP_DIRS = {"__pycache__", "node_modules", ".git", ".hg", ".svn", ".tox", ".venv", "venv", ".mypy_cache"}


def language_of(path: str) -> str | None:
    """Language from a file name, or None when the type is not code or text we know."""
    name = os.path.basename(path).lower()
    if name in FILENAMES:
        return FILENAMES[name]
    if name.endswith(".bzl"):
        return "starlark"
    stem, dot, ext = name.rpartition(".")
    return LANGUAGES.get(ext) if dot and stem else None


@dataclass
class Document:
    path: str  # where it came from (file path, or jsonl file:line)
    language: str
    source: str  # the source spec it came from (folder, repo, package:NAME, jsonl file)
    text: str | None = None  # decoded text (jsonl records; files after filters.decode)
    data: bytes | None = None  # raw bytes of a file not decoded yet
    size: int = 0  # bytes


@dataclass
class SourceStats:
    files: dict[str, int] = field(default_factory=dict)  # documents yielded per source
    unknown_type: int = 0  # files skipped: no known language
    unreadable: int = 0  # files that could not be read (permissions, vanished)

    def as_dict(self) -> dict:
        return {"documents": dict(self.files), "skipped_unknown_type": self.unknown_type, "unreadable": self.unreadable}


def _read_file(path: Path, rel: str, source: str, language: str, max_bytes: int, stats: SourceStats) -> Document | None:
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size <= max_bytes else None
    except OSError:
        stats.unreadable += 1
        return None
    stats.files[source] = stats.files.get(source, 0) + 1
    return Document(path=rel, language=language, source=source, data=data, size=size)


def _files_docs(root: Path, rels: Iterator[str], source: str, max_bytes: int, stats: SourceStats) -> Iterator[Document]:
    for rel in rels:
        language = language_of(rel)
        if language is None:
            stats.unknown_type += 1
            continue
        path = root / rel
        if path.is_symlink() or not path.is_file():
            continue
        doc = _read_file(path, str(path), source, language, max_bytes, stats)
        if doc is not None:
            yield doc


def _walk(root: Path) -> Iterator[str]:
    """Relative paths under root, sorted (deterministic order), skipping hidden and cache folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.relpath(os.path.join(dirpath, name), root)


def is_git_repo(path: Path) -> bool:
    """A git work tree, or a folder inside one (then its files are listed by git, .gitignore applies) that
    git does not ignore: git lists none of an ignored folder's files (a data dump, a virtualenv), and one
    named as a source is meant to be read."""
    if (path / ".git").exists():
        return True
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--is-inside-work-tree"],
                             capture_output=True, timeout=60)
        if out.returncode != 0 or out.stdout.strip() != b"true":
            return False
        ignored = subprocess.run(["git", "-C", str(path), "check-ignore", "-q", "."], capture_output=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return ignored.returncode != 0  # 0: ignored


def _git_files(root: Path) -> Iterator[str]:
    """Tracked files plus untracked ones that .gitignore does not exclude."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=600,
        ).stdout
    except FileNotFoundError:
        raise UserError(f"{root} is a git repository but the `git` command is not installed") from None
    except subprocess.CalledProcessError as e:
        raise UserError(f"`git ls-files` failed in {root}: {e.stderr.decode(errors='replace').strip()}") from None
    yield from sorted(set(p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p))


def path_documents(path: str | Path, max_bytes: int, stats: SourceStats) -> Iterator[Document]:
    """A folder (walked), a git repository (git ls-files), or one file (a .jsonl file is read as records)."""
    root = Path(path).expanduser()
    source = str(path)
    if root.is_file() and root.name.endswith((".jsonl", ".jsonl.gz")):
        yield from jsonl_documents(root, max_bytes, stats)
    elif root.is_file():
        rel = root.name
        yield from _files_docs(root.parent, iter([rel]), source, max_bytes, stats)
    elif is_git_repo(root):
        yield from _files_docs(root, _git_files(root), source, max_bytes, stats)
    elif root.is_dir():
        yield from _files_docs(root, _walk(root), source, max_bytes, stats)
    else:
        raise UserError(f"source {path} does not exist: pass a folder, a git repository or a file")


def _not_installed(name: str) -> str:
    return f"package {name!r} is not installed in this Python environment: `pip install {name}` first"


def package_documents(name: str, max_bytes: int, stats: SourceStats) -> Iterator[Document]:
    """The files of an installed distribution (importlib.metadata), e.g. `numpy`, that have a known language."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(_not_installed(name)) from None
    source = f"package:{name}"
    project = _editable_project(dist)
    if project is not None:  # `pip install -e`: the files are in the project folder, not among dist.files
        rels = _git_files(project) if is_git_repo(project) else _walk(project)
        yield from _files_docs(project, rels, source, max_bytes, stats)
        return
    files = sorted(str(f) for f in (dist.files or []) if ".dist-info/" not in str(f) and ".egg-info/" not in str(f))
    root = Path(dist.locate_file(""))
    yield from _files_docs(root, iter(files), source, max_bytes, stats)


def _editable_project(dist: importlib.metadata.Distribution) -> Path | None:
    """The project folder of an editable install (PEP 660/610: direct_url.json), else None."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except json.JSONDecodeError:
        return None
    url = info.get("url", "")
    if not (info.get("dir_info") or {}).get("editable") or not url.startswith("file://"):
        return None
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    return path if path.is_dir() else None


def jsonl_documents(path: str | Path, max_bytes: int, stats: SourceStats) -> Iterator[Document]:
    """One document per record, its text in `text` or `content`; language from `language`/`lang` or from
    a `path`/`max_stars_repo_path` field's extension, else "text". `.jsonl.gz` is read too."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"jsonl file {path} does not exist")
    source = str(path)
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rt", encoding="utf-8-sig", errors="strict") as f:  # -sig: a byte-order mark is not JSON
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{lineno}: not a JSON record ({e.msg})") from None
                text = rec.get("text", rec.get("content")) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{p}:{lineno}: a record needs a string field `text` or `content`")
                rpath = rec.get("path") or rec.get("max_stars_repo_path") or ""
                language = rec.get("language") or rec.get("lang") or language_of(str(rpath)) or "text"
                stats.files[source] = stats.files.get(source, 0) + 1
                size = len(text.encode("utf-8", "surrogatepass"))
                yield Document(
                    path=f"{p}:{lineno}" + (f":{rpath}" if rpath else ""),
                    language=str(language).lower(),
                    source=source,
                    text=text if size <= max_bytes else None,
                    size=size,
                )
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read {p}: {e}") from None


@dataclass
class SourceSpec:
    kind: str  # "path" | "package" | "jsonl"
    value: str

    def __str__(self) -> str:
        return self.value if self.kind != "package" else f"package:{self.value}"


def check_sources(specs: list[SourceSpec]) -> None:
    """Fail fast, before any work, on a source that does not exist."""
    if not specs:
        raise UserError(
            "no sources: pass --source PATH (folder, git repository or file), --package NAME or --jsonl FILE"
        )
    for s in specs:
        if s.kind == "path" and not Path(s.value).expanduser().exists():
            raise UserError(f"source {s.value} does not exist: pass a folder, a git repository or a file")
        if s.kind == "jsonl" and not Path(s.value).expanduser().is_file():
            raise UserError(f"jsonl file {s.value} does not exist")
        if s.kind == "package":
            try:
                importlib.metadata.distribution(s.value)
            except importlib.metadata.PackageNotFoundError:
                raise UserError(_not_installed(s.value)) from None


def documents(specs: list[SourceSpec], max_bytes: int, stats: SourceStats) -> Iterator[Document]:
    """All sources, one after another."""
    for s in specs:
        if s.kind == "path":
            yield from path_documents(s.value, max_bytes, stats)
        elif s.kind == "package":
            yield from package_documents(s.value, max_bytes, stats)
        elif s.kind == "jsonl":
            yield from jsonl_documents(s.value, max_bytes, stats)
        else:
            raise ValueError(s.kind)
