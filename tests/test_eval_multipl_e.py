"""MultiPL-E: hand-written right and wrong solutions get the right verdict in every language whose
toolchain is installed; a missing toolchain is `skipped` with an install command, never failed."""

from __future__ import annotations

import json

import pytest

from codellama.errors import UserError
from codellama.eval.runner import EvalConfig, run_task
from codellama.eval.sandbox import Sandbox
from codellama.eval.tasks import get_task
from codellama.eval.tasks.multipl_e import LANGS, MULTIPLE_LANGS

# (add(x, y), strlen(s)) completions that close the function where the tests do not
RIGHT = {
    "cpp": ("    return x + y;\n", "    return string.size();\n"),
    "java": ("        return x + y;\n", "        return string.length();\n"),
    "js": ("  return x + y;\n}\n", "  return string.length;\n}\n"),
    "ts": ("  return x + y;\n}\n", "  return string.length;\n}\n"),
    # PHP's HumanEval_23_strlen can never pass (it redeclares the builtin strlen: a MultiPL-E erratum),
    # so PHP's second problem is HumanEval_13_greatest_common_divisor
    "php": ("    return $x + $y;\n}\n", "    while ($b) { [$a, $b] = [$b, $a % $b]; }\n    return $a;\n}\n"),
    "sh": ("    echo $(( $1 + $2 ))\n", "    echo ${#1}\n"),
    "rs": ("    x + y\n", "    string.len() as isize\n"),
    "go": ("    return x + y\n}\n", "    return len(myString)\n}\n"),
    "rb": ("  x + y\nend\n", "  string.length\nend\n"),
    "lua": ("    return x + y\nend\n", "    return #string\nend\n"),
    "pl": ("    return $x + $y;\n}\n", "    return length($string);\n}\n"),
    "r": ("  x + y\n}\n", "  nchar(string)\n}\n"),
    "rkt": ("  (+ x y))\n", "  (string-length string))\n"),
    "jl": ("    x + y\nend\n", "    length(string)\nend\n"),
    "scala": ("        x + y\n", "        string.length.toLong\n"),
    "swift": ("    return x + y\n}\n", "    return string.count\n}\n"),
    "d": ("{\n    return x + y;\n}\n", "{\n    return cast(long) string.length;\n}\n"),
    "cs": ("        return x + y;\n", "        return str.Length;\n"),
}
WRONG = {
    "cpp": "    return x - y;\n", "java": "        return x - y;\n", "js": "  return x - y;\n}\n",
    "ts": "  return x - y;\n}\n", "php": "    return $x - $y;\n}\n", "sh": "    echo $(( $1 - $2 ))\n",
    "rs": "    x - y\n", "go": "    return x - y\n}\n", "rb": "  x - y\nend\n", "lua": "    return x - y\nend\n",
    "pl": "    return $x - $y;\n}\n", "r": "  x - y\n}\n", "rkt": "  (- x y))\n", "jl": "    x - y\nend\n",
    "scala": "        x - y\n", "swift": "    return x - y\n}\n", "d": "{\n    return x - y;\n}\n",
    "cs": "        return x - y;\n",
}
# a right answer followed by an early successful exit before the tests: must fail (sentinel)
EARLY_EXIT = {
    "js": "  return x + y;\n}\nprocess.exit(0);\n", "ts": "  return x + y;\n}\n(globalThis as any).process.exit(0);\n",
    "php": "    return $x + $y;\n}\nexit(0);\n", "sh": "    echo $(( $1 + $2 ))\n}\nexit 0\nf() {\n",
    "rb": "  x + y\nend\nexit!(0)\n", "lua": "    return x + y\nend\nos.exit(0)\n", "pl": "    return $x + $y;\n}\nexit 0;\n",
    "r": "  x + y\n}\nquit(status = 0)\n", "go": "    return x + y\n}\nfunc init() { os.Exit(0) }\n",
    "cpp": "    return x + y;\n}\nstatic int _e = (exit(0), 0);\nvoid _unused() {\n",
    "rs": "    std::process::exit(0);\n",
    "java": "        System.exit(0); return 0;\n",
}
assert sorted(RIGHT) == sorted(MULTIPLE_LANGS) == sorted(WRONG)
AVAILABLE = [lang for lang in MULTIPLE_LANGS if LANGS[lang].missing() is None]


COMPILED = {"cpp", "java", "ts", "rs", "go", "scala", "swift", "d", "cs"}  # seconds per program: slow set


def verdicts(data_dir, lang: str) -> dict:
    task = get_task(f"multipl-e-{lang}", data_dir)
    probs = {p["task_id"]: p for p in task.load()}
    add = probs["HumanEval_53_add"]
    second = probs["HumanEval_13_greatest_common_divisor" if lang == "php" else "HumanEval_23_strlen"]
    cases = {"right_add": (add, RIGHT[lang][0]), "right_second": (second, RIGHT[lang][1]), "wrong_add": (add, WRONG[lang])}
    if lang in EARLY_EXIT:
        cases["early_exit"] = (add, EARLY_EXIT[lang])
    names = list(cases)
    with Sandbox(workers=2) as sb:
        out = dict(sb.map([task.program(*cases[k]) for k in names]))
    return {k: out[i] for i, k in enumerate(names)}


@pytest.mark.parametrize(
    "lang", [pytest.param(lang, marks=pytest.mark.slow) if lang in COMPILED else lang for lang in MULTIPLE_LANGS]
)
def test_right_and_wrong_solutions(shared_data, lang):
    if lang not in AVAILABLE:
        pytest.skip(f"toolchain missing: {LANGS[lang].missing().install}")
    v = verdicts(shared_data, lang)
    for kind in ("right_add", "right_second"):
        assert v[kind].passed, (lang, kind, v[kind].result, v[kind].stderr[-2000:])
    assert not v["wrong_add"].passed
    if "early_exit" in v:
        assert not v["early_exit"].passed, v["early_exit"].result


def test_cs_failed_debug_assert_fails(shared_data):
    """mono exits 0 after a failed Debug.Assert (and goes on to print the nonce): every C# answer that
    compiled passed. As MultiPL-E's eval_cs, the assert is traced to stderr and that trace fails the run."""
    import shutil

    from codellama.eval.sandbox import Program, Step

    task = get_task("multipl-e-cs", shared_data)
    add = next(p for p in task.load() if p["task_id"] == "HumanEval_53_add")
    program = task.program(add, WRONG["cs"])
    assert program.env["MONO_TRACE_LISTENER"] == "Console.Error"
    # what mono 6.8 prints for `Debug.Assert(false)` with that listener, then status 0 as it gives
    trace = ("echo 'Fail: ' >&2\necho '  at System.Diagnostics.DefaultTraceListener.Fail (System.String message, "
             "System.String detailMessage) [0x00000]' >&2\necho 'NONCE'\n")
    mono_like = Program(files={"t.sh": trace}, steps=[Step((shutil.which("bash"), "t.sh"))], sentinel="NONCE",
                        stderr_failures=program.stderr_failures)
    quiet = Program(files={"t.sh": "echo NONCE\n"}, steps=[Step((shutil.which("bash"), "t.sh"))], sentinel="NONCE",
                    stderr_failures=program.stderr_failures)
    with Sandbox(workers=1) as sb:
        failed, passed = sb.run(mono_like), sb.run(quiet)
    assert (failed.status, passed.status) == ("failed", "passed"), failed.result
    assert "DefaultTraceListener.Fail" in failed.detail


def test_the_brief_languages_are_installed_in_ci():
    """The languages the issue requires to run. CI installs them and sets CODELLAMA_CI_TOOLCHAINS=1, which
    turns a missing one into a failure; elsewhere a missing toolchain only skips."""
    import os

    must = ["js", "ts", "cpp", "java", "sh", "php", "rs", "go", "rb", "lua"]
    missing = {lang: LANGS[lang].missing().install for lang in must if LANGS[lang].missing()}
    if os.environ.get("CODELLAMA_CI_TOOLCHAINS") == "1":
        assert not missing
    elif missing:
        pytest.skip(f"toolchains missing here: {missing}")


def test_missing_toolchain_is_skipped_with_install_hint(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    (tmp_path / "s.jsonl").write_text('{"task_id": "HumanEval_53_add", "completion": "x"}\n')
    cfg = EvalConfig(task="multipl-e-php", data_dir=str(shared_data), out=tmp_path / "o", phase="execute",
                     samples=str(tmp_path / "s.jsonl"), progress=False)
    s = run_task(cfg)
    assert "skipped" in s and "apt-get install -y php-cli" in s["skipped"]
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_unknown_language(shared_data):
    with pytest.raises(UserError, match="unknown task 'multipl-e-cobol'"):
        get_task("multipl-e-cobol", shared_data)


def test_timeout_flag_limits_the_program_run(tmp_path, shared_data):
    """--timeout reaches the run step of a MultiPL-E program (it was ignored: every step kept the language's
    own limits). The CPU limit follows the timeout, int(timeout) + 1 s, and bash can say what it is."""
    if "sh" not in AVAILABLE:
        pytest.skip("bash is not installed")
    completion = '    echo "cpu limit $(ulimit -t)" >&2\n    exit 3\n'
    (tmp_path / "s.jsonl").write_text(json.dumps({"task_id": "HumanEval_53_add", "completion": completion}) + "\n")
    cfg = EvalConfig(task="multipl-e-sh", data_dir=str(shared_data), out=tmp_path / "o", phase="execute",
                     samples=str(tmp_path / "s.jsonl"), timeout=3.0, workers=1, progress=False)
    run_task(cfg)
    row = json.loads((tmp_path / "o" / "results.jsonl").read_text())
    assert row["result"] == "failed: cpu limit 4"
