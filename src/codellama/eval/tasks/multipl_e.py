"""MultiPL-E (Cassano et al.): HumanEval translated to 18 languages, zero-shot, greedy pass@1 in the paper.

Program = prompt + completion + "\\n" + tests (the completion cut at the record's stop tokens), as in
MultiPL-E's pipeline and the bigcode harness. Each language has its toolchain commands (after MultiPL-E's
evaluation/src/eval_*.py and its Dockerfile); a missing toolchain makes the task `skipped` with the command
that installs it. Pass = every step exits 0, plus, where the language allows it, a nonce printed after the
last assert (so an early exit(0) fails); racket's rackunit reports failures on stderr with status 0, so
there any stderr output fails; mono exits 0 after a failed C# Debug.Assert, so there its trace fails. C# is
scored with the DeepSeek-fixed `humaneval-cs.jsonl`: MultiPL-E's original list `.Equals` asserts
(humaneval-cs-bu.jsonl) compare references and can never pass (data README).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from codellama.errors import UserError
from codellama.eval.data import data_file, read_jsonl
from codellama.eval.sandbox import Limits, Program, Step, new_nonce, runs_isolated, sandbox_python
from codellama.eval.tasks.base import Task, Unavailable, truncate

RUN = Limits(timeout=10.0)
COMPILE = Limits(timeout=60.0, memory_bytes=None, max_processes=256, max_output_bytes=256 << 10)
JVM = Limits(timeout=15.0, memory_bytes=None, max_processes=256)  # the JVM reserves a huge address space
JAVATUPLES = ("/usr/share/java/javatuples.jar", "/usr/share/java/javatuples-1.2.jar")


def _append(line: str) -> Callable[[str, str], str]:
    return lambda tests, nonce: tests.rstrip("\n") + "\n" + line.format(nonce=nonce) + "\n"


def _before_last_brace(stmt: str, skip: int = 0) -> Callable[[str, str], str]:
    """Insert `stmt` before the closing brace of main (the last `}`, or the one before it when the class
    closes last: skip=1)."""

    def f(tests: str, nonce: str) -> str | None:
        end = len(tests)
        for _ in range(skip + 1):
            end = tests.rfind("}", 0, end)
            if end < 0:
                return None
        return tests[:end] + "    " + stmt.format(nonce=nonce) + "\n" + tests[end:]

    return f


def _lua(tests: str, nonce: str) -> str | None:
    run = "os.exit(lu.LuaUnit.run())"
    if run not in tests:
        return None
    return tests.replace(run, f'local __failures = lu.LuaUnit.run()\nif __failures == 0 then print("{nonce}") end\nos.exit(__failures)')


def _ruby_prefix(nonce: str) -> str:
    # test/unit runs the tests in an at_exit hook installed by `require`; at_exit hooks run last-in
    # first-out, so one installed first (before everything) runs after the tests and sees their exit status
    return f'at_exit {{ puts "{nonce}" if $!.nil? || ($!.is_a?(SystemExit) && $!.success?) }}\n'


def _d(tests: str, nonce: str) -> str | None:
    if "void main(){}" not in tests:
        return None
    return tests.replace("void main(){}", f'void main(){{ import std.stdio : writeln; writeln("{nonce}"); }}')


@dataclass(frozen=True)
class Lang:
    """How to run one MultiPL-E language. Step argv may use {file}, {stem}, {jar}."""

    name: str  # the file suffix in humaneval-<name>.jsonl
    file: str  # source file name
    steps: tuple[tuple[str, ...], ...]
    tools: tuple[str, ...]  # binaries that must be on PATH
    install: str
    sentinel: Callable[[str, str], str | None] | None = None  # None from it: no place for the nonce
    prefix: Callable[[str], str] | None = None  # code put before the prompt (ruby's at_exit)
    compile_steps: int = 0  # leading steps that build (longer limits)
    fail_on_stderr: bool = False
    stderr_failures: tuple[str, ...] = ()  # stderr text that fails a run with status 0
    run_limits: Limits = RUN
    env: dict = field(default_factory=dict)
    extra_files: dict = field(default_factory=dict)
    needs_file: tuple[str, ...] = ()  # any one of these must exist (e.g. javatuples.jar)

    def missing(self) -> Unavailable | None:
        for tool in self.tools:
            if not shutil.which(tool, path=_path()):
                return Unavailable(f"{tool} is not installed, needed for multipl-e-{self.name}", self.install)
        if self.needs_file and not any(Path(p).exists() for p in self.needs_file):
            return Unavailable(f"{self.needs_file[0]} is missing, needed for multipl-e-{self.name}", self.install)
        return None


def _path() -> str:
    """Toolchains may live outside the sandbox's minimal PATH (rustup's ~/.cargo/bin, npm's global bin)."""
    import os

    return os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")


GO_MOD = "module humaneval\n\ngo 1.18\n"
# mono exits 0 after a failed Debug.Assert, and says so only through a trace listener: on stderr with
# MONO_TRACE_LISTENER=Console.Error; MultiPL-E's eval_cs fails a run whose stderr has one of these
MONO_FAILURES = ("System.Diagnostics.DefaultTraceListener.Fail", "Unhandled Exception")
LANGS: dict[str, Lang] = {lang.name: lang for lang in [
    Lang("py", "main.py", (("{python}", "-I", "{file}"),), (), "apt-get install -y python3",
         sentinel=_append("print({nonce!r})")),
    Lang("js", "main.js", (("node", "{file}"),), ("node",), "apt-get install -y nodejs",
         sentinel=_append('console.log("{nonce}");'), run_limits=Limits(timeout=10.0, memory_bytes=None)),
    Lang("ts", "main.ts", (("tsc", "--target", "esnext", "--lib", "esnext,dom", "--module", "commonjs", "--types", "",
                            "--skipLibCheck", "{file}"), ("node", "main.js")),
         ("tsc", "node"), "apt-get install -y nodejs npm && npm install -g typescript", compile_steps=1,
         sentinel=_append('console.log("{nonce}");'), run_limits=Limits(timeout=10.0, memory_bytes=None)),
    Lang("cpp", "main.cpp", (("g++", "-std=c++17", "-O0", "-o", "main", "{file}"), ("./main",)), ("g++",),
         "apt-get install -y g++", compile_steps=1, sentinel=_before_last_brace('puts("{nonce}");')),
    Lang("java", "Problem.java", (("javac", "-encoding", "UTF8", "-cp", "{jar}", "{file}"),
                                  ("java", "-ea", "-Xmx512m", "-Xss16m", "-XX:+UseSerialGC", "-cp", ".:{jar}", "Problem")),
         ("javac", "java"), "apt-get install -y default-jdk-headless libjavatuples-java", compile_steps=1,
         sentinel=_before_last_brace('System.out.println("{nonce}");', skip=1), run_limits=JVM, needs_file=JAVATUPLES),
    Lang("sh", "main.sh", (("bash", "{file}"),), ("bash",), "apt-get install -y bash", sentinel=_append('echo "{nonce}"')),
    Lang("php", "main.php", (("php", "{file}"),), ("php",), "apt-get install -y php-cli",
         sentinel=_append('echo "{nonce}\\n";')),
    Lang("rs", "main.rs", (("rustc", "-C", "opt-level=0", "--edition", "2021", "-o", "main", "{file}"), ("./main",)),
         ("rustc",), "curl https://sh.rustup.rs -sSf | sh -s -- -y (or apt-get install -y rustc)", compile_steps=1,
         sentinel=_before_last_brace('println!("{nonce}");')),
    Lang("go", "main_test.go", (("go", "test", "-c", "-o", "main.test", "."), ("./main.test", "-test.v")),
         ("go",), "apt-get install -y golang-go", compile_steps=1,
         sentinel=_before_last_brace('fmt.Println("{nonce}")'), extra_files={"go.mod": GO_MOD},
         env={"CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "GOPROXY": "off",
              "TMPDIR": "/tmp"}),  # go ignores a go.mod that sits in the temp root itself
    Lang("rb", "main.rb", (("ruby", "{file}"),), ("ruby",), "apt-get install -y ruby", prefix=_ruby_prefix),
    Lang("lua", "main.lua", (("lua5.4", "{file}"),), ("lua5.4",), "apt-get install -y lua5.4 lua-unit", sentinel=_lua),
    Lang("pl", "main.pl", (("perl", "{file}"),), ("perl",), "apt-get install -y perl libtest-deep-perl",
         sentinel=_append('print "\\n{nonce}\\n";')),
    Lang("r", "main.r", (("Rscript", "{file}"),), ("Rscript",), "apt-get install -y r-base-core",
         sentinel=_append('cat("{nonce}\\n")'), run_limits=Limits(timeout=10.0, memory_bytes=None)),
    Lang("jl", "main.jl", (("julia", "{file}"),), ("julia",), "install Julia from https://julialang.org/downloads/",
         sentinel=_append('println("{nonce}")'), run_limits=Limits(timeout=30.0, memory_bytes=None)),
    Lang("rkt", "main.rkt", (("racket", "{file}"),), ("racket",), "apt-get install -y racket",
         sentinel=_append('(displayln "{nonce}")'), fail_on_stderr=True,
         run_limits=Limits(timeout=20.0, memory_bytes=None)),
    Lang("scala", "Problem.scala", (("scalac", "{file}"), ("scala", "-J-Xmx512m", "Problem")), ("scalac", "scala"),
         "apt-get install -y scala", compile_steps=1, sentinel=_before_last_brace('println("{nonce}")', skip=1),
         run_limits=JVM),
    Lang("swift", "main.swift", (("swiftc", "-Onone", "-o", "main", "{file}"), ("./main",)), ("swiftc",),
         "install Swift from https://www.swift.org/install/", compile_steps=1, sentinel=_append('print("{nonce}")')),
    Lang("d", "main.d", (("rdmd", "-unittest", "{file}"),), ("rdmd",), "install DMD from https://dlang.org/download.html",
         sentinel=_d, run_limits=Limits(timeout=30.0, memory_bytes=None)),
    Lang("cs", "Problem.cs", (("mcs", "-d:DEBUG", "-r:System.Numerics.dll", "-out:main.exe", "{file}"),
                              ("mono", "main.exe")), ("mcs", "mono"), "apt-get install -y mono-devel", compile_steps=1,
         sentinel=_before_last_brace('System.Console.WriteLine("{nonce}");', skip=1),
         run_limits=Limits(timeout=15.0, memory_bytes=None), env={"MONO_TRACE_LISTENER": "Console.Error"},
         stderr_failures=MONO_FAILURES),
]}
MULTIPLE_LANGS = [name for name in LANGS if name != "py"]  # the 18 data files


@lru_cache(maxsize=None)
def _resolve(tool: str) -> str:
    """Absolute path of a tool; rustup's proxy (which needs $HOME/.rustup) is replaced by the real rustc."""
    import subprocess

    exe = shutil.which(tool, path=_path()) or tool
    if tool == "rustc" and ".cargo" in exe:
        try:
            sysroot = subprocess.run([exe, "--print", "sysroot"], capture_output=True, text=True, timeout=60).stdout.strip()
            if sysroot and Path(sysroot, "bin", "rustc").exists():
                return str(Path(sysroot, "bin", "rustc"))
        except (OSError, subprocess.SubprocessError):
            pass
    return exe


def _go_cache() -> str:
    """One build cache for all Go programs (a cold cache rebuilds the standard library: ~10 s a program).
    It is written only by the compile step, which runs as us, never by the sandboxed test binary."""
    import tempfile

    path = Path(tempfile.gettempdir()) / "codellama-go-cache"
    path.mkdir(mode=0o700, exist_ok=True)
    return str(path)


def build_program(lang: Lang, prompt: str, completion: str, tests: str, run_limits: Limits | None = None) -> Program:
    """The program of one completion. run_limits: for running it (default: the language's); the build steps
    keep COMPILE's."""
    run_limits = run_limits or lang.run_limits
    nonce = new_nonce() if lang.sentinel or lang.prefix else None
    marked = lang.sentinel(tests, nonce) if lang.sentinel else None
    if lang.sentinel and marked is None:
        nonce = None  # tests of an unexpected shape: exit status only
    body = (lang.prefix(nonce) if lang.prefix and nonce else "") + prompt + completion + "\n" + (marked or tests)
    jar = next((p for p in JAVATUPLES if Path(p).exists()), JAVATUPLES[0])
    stem = Path(lang.file).stem
    steps, env = [], dict(lang.env)
    for i, argv in enumerate(lang.steps):
        argv = tuple(a.format(file=lang.file, stem=stem, jar=jar, python=sandbox_python()) for a in argv)
        tool = _resolve(argv[0])
        compiling = i < lang.compile_steps
        if lang.name == "go" and compiling:
            env["GOCACHE"] = _go_cache()
            isolate = False
        else:
            isolate = argv[0].startswith("./") or runs_isolated(_resolve(argv[0]))
        steps.append(Step((tool, *argv[1:]) if not argv[0].startswith("./") else argv,
                          limits=COMPILE if compiling else run_limits, isolate_uid=isolate))
    if lang.name == "go":
        env.setdefault("GOPATH", "/nonexistent")
    return Program(files={lang.file: body, **lang.extra_files}, steps=steps, sentinel=nonce,
                   limits=run_limits, env=env, fail_on_stderr=lang.fail_on_stderr, stderr_failures=lang.stderr_failures)


class MultiPLE(Task):
    """multipl-e-<lang>: completion of the translated HumanEval prompt."""

    max_new_tokens = 512

    def __init__(self, lang: str, data_dir=None):
        super().__init__(data_dir)
        self.lang = LANGS[lang]
        self.name = f"multipl-e-{lang}"
        self.limits = self.lang.run_limits  # the runner's --timeout replaces its timeout

    def load(self) -> list[dict]:
        path = data_file(self.data_dir, "multipl-e", f"humaneval-{self.lang.name}.jsonl", self.name)
        rows = list(read_jsonl(path, ("name", "prompt", "tests", "stop_tokens")))

        def number(row: dict) -> int:  # rows are sorted by it: an AttributeError traceback for another name
            found = re.match(r"HumanEval_(\d+)_", str(row["name"]))
            if not found:
                raise UserError(f"{path}: problem name {row['name']!r} is not of the form HumanEval_<n>_<name>; "
                                "give MultiPL-E's humaneval-<lang>.jsonl")
            return int(found.group(1))

        rows.sort(key=number)
        if rows:
            self.stop = tuple(rows[0]["stop_tokens"])
        return [dict(r, task_id=r["name"]) for r in rows]

    def unavailable(self) -> Unavailable | None:
        return self.lang.missing()

    def prompt(self, problem: dict) -> str:
        return problem["prompt"]

    def postprocess(self, problem: dict, generation: str, instruct: bool = False) -> str:
        return truncate(generation, problem["stop_tokens"])

    def program(self, problem: dict, completion: str, instruct: bool = False) -> Program:
        return build_program(self.lang, problem["prompt"], completion, problem["tests"], self.limits)


def multipl_e_tasks() -> dict:
    return {f"multipl-e-{lang}": (lambda d=None, _l=lang: MultiPLE(_l, d)) for lang in MULTIPLE_LANGS}
