"""The sandbox against hostile completions: each is contained, scored as a failure, and leaves the machine
as it was (our process alive, files outside the working dir intact, no process left behind)."""

from __future__ import annotations

import os
import socket
import textwrap
import time

import pytest

from codellama.eval.sandbox import OUTPUT_TAIL, Limits, Sandbox, capabilities
from codellama.eval.tasks.base import python_program
from codellama.eval.tasks.humaneval import HumanEval

CAPS = capabilities()
OUR_PARENT = os.getppid()
needs_uid = pytest.mark.skipif(not CAPS.uid_drop, reason="no uid separation without root (see Sandbox.notes)")
needs_netns = pytest.mark.skipif(not CAPS.netns, reason="cannot create a network namespace here")
WORKERS = 2


# Leaving a process behind is not by itself a wrong answer, so those cases also answer wrongly.
# kill(-1) from the sandbox uid reaches only that uid's processes, so a correct answer would then pass.
WRONG_ANSWER = ("child_left_running", "daemon_double_fork", "kill_everything")


def module_level(body: str, code: str) -> str:
    """A HumanEval/0 completion: the function body, then `code` run at import, before the asserts. With
    the canonical body, the hostile code is the only reason to fail."""
    return body + textwrap.dedent(code)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    canary_dir = root / "canary"
    canary_dir.mkdir()
    canary = canary_dir / "canary.txt"
    canary.write_text("still here")
    home = root / "home"
    home.mkdir(mode=0o700)
    (home / "secret.txt").write_text("TOP-SECRET-42")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    return {"canary": canary, "home": home, "listener": listener, "port": listener.getsockname()[1]}


def hostile_cases(env) -> dict[str, str]:
    canary, port, home = env["canary"], env["port"], env["home"]
    cases = {
        "fork_bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n",
        "infinite_loop": "while True: pass\n",
        "memory_bomb": "x = []\nwhile True: x.append(bytearray(100 * 2**20))\n",
        "gigabytes_of_output": "import sys\nwhile True: sys.stdout.write('x' * 2**20)\n",
        "exit_before_asserts": "exit(0)\n",
        "sys_exit_before_asserts": "import sys; sys.exit(0)\n",
        "os_exit_before_asserts": "import os; os._exit(0)\n",
        "raise_systemexit": "raise SystemExit\n",
        "kill_parent": "import os, signal, time; os.kill(os.getppid(), signal.SIGKILL); time.sleep(1)\n",
        "delete_outside": f"import os, shutil\nos.remove({str(canary)!r})\nshutil.rmtree({str(canary.parent)!r})\n",
        "write_outside": f"open({str(canary)!r}, 'w').write('overwritten')\n",
        "read_home": (
            "import os, pathlib\nprint(sorted(os.listdir(os.environ['HOME'])))\n"
            f"print(pathlib.Path({str(home / 'secret.txt')!r}).read_text())\n"
            "print(pathlib.Path('/root').iterdir().__next__())\n"
        ),
        "network": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n",
        "network_outside": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n",
        "ignore_signals": (
            "import signal\nfor s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
            "    signal.signal(s, signal.SIG_IGN)\nwhile True: pass\n"
        ),
        "child_left_running": (
            "import subprocess, sys\np = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
            "print('CHILDPID', p.pid, file=sys.stderr)\n"
        ),
        "daemon_double_fork": (
            "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(600)\n    os._exit(0)\nprint('forked', file=sys.stderr)\n"
        ),
        "close_stdout_then_pass": "import os; os.close(1)\n",
        "block_on_stdin": "input()\n",
        "fill_disk": "f = open('big', 'wb')\nwhile True: f.write(b'x' * 2**20)\n",
    }
    if CAPS.uid_drop:  # without uid separation this would kill every process of the user, pytest included
        cases["kill_everything"] = "import os, signal; os.kill(-1, signal.SIGKILL)\n"
    return cases


@pytest.fixture(scope="module")
def results(env):
    task = HumanEval()
    problem = next(p for p in task.load() if p["task_id"] == "HumanEval/0")
    task.limits = Limits(timeout=2.0, memory_bytes=512 << 20, max_output_bytes=256 << 10, file_size_bytes=8 << 20)
    cases = hostile_cases(env)
    names = list(cases)
    with Sandbox(workers=WORKERS) as sb:
        right, wrong = task.reference(problem), "    return False\n"
        programs = [task.program(problem, module_level(wrong if n in WRONG_ANSWER else right, cases[n])) for n in names]
        programs.append(task.program(problem, task.reference(problem)))  # a control that must pass
        # 3 MiB printed, past the 256 KiB kept, then the asserts: the verdict is theirs
        chatty = "import sys\nfor _ in range(3 * 1024):\n    print('y' * 1023)\nprint('wrote', file=sys.stderr)\n"
        programs += [task.program(problem, module_level(body, chatty)) for body in (right, wrong)]
        out = dict(sb.map(programs))
        uid_base = sb.uid_base
    n = len(names)
    return {**{name: out[i] for i, name in enumerate(names)}, "_control": out[n], "_chatty_right": out[n + 1],
            "_chatty_wrong": out[n + 2], "_uid_base": uid_base}


def test_control_passes(results):
    assert results["_control"].passed, results["_control"].result


@pytest.mark.parametrize("name", [n for n in hostile_cases({"canary": __import__("pathlib").Path("/x/y"), "port": 1, "home": __import__("pathlib").Path("/h")})])
def test_hostile_completion_fails(results, name):
    res = results[name]
    assert not res.passed, f"{name} passed: {res.result}"
    assert res.status in ("failed", "timed out")
    assert res.duration < 15


def test_timeouts_and_limits_are_reported(results):
    assert results["infinite_loop"].status == "timed out"
    assert results["ignore_signals"].status == "timed out"
    flood = results["gigabytes_of_output"]
    assert flood.status == "timed out"
    assert len(flood.stdout) <= (256 << 10) + OUTPUT_TAIL + 100 and "bytes of output left out" in flood.stdout
    assert "MemoryError" in results["memory_bomb"].detail or results["memory_bomb"].status == "timed out"
    for name in ("exit_before_asserts", "sys_exit_before_asserts", "os_exit_before_asserts", "raise_systemexit"):
        assert results[name].returncode == 0 and "did not run to the end" in results[name].detail


def test_output_past_the_limit_leaves_the_verdict_to_the_tests(results):
    right, wrong = results["_chatty_right"], results["_chatty_wrong"]
    assert right.passed, right.result
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.detail
    # the start and the end kept (the sentinel the right one passed by is printed last), the rest counted
    assert right.stdout.startswith("y" * 1023) and right.stderr == "wrote\n"
    assert "bytes of output left out" in right.stdout and len(right.stdout) < (256 << 10) + OUTPUT_TAIL + 100


def test_we_survive(results):
    # we are alive (this runs), and so is our parent: we were not re-parented (kill_parent kills its own
    # parent: the zygote, or the harness when started without one)
    assert os.getppid() == OUR_PARENT


@needs_uid
def test_files_outside_unharmed(results, env):
    assert env["canary"].read_text() == "still here"
    assert "Permission denied" in results["delete_outside"].detail
    assert "Permission denied" in results["write_outside"].detail


@needs_uid
def test_home_not_readable(results):
    res = results["read_home"]
    assert "TOP-SECRET-42" not in res.stdout + res.stderr
    assert "['main.py', 'program.py']" in res.stdout  # $HOME is the scratch dir: the launcher and the code
    assert "Permission denied" in res.detail


@needs_netns
def test_no_network(results, env):
    assert not results["network"].passed
    with pytest.raises(BlockingIOError):
        env["listener"].accept()  # nobody connected
    assert "unreachable" in results["network_outside"].detail.lower() or "Errno" in results["network_outside"].detail


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_no_survivors(results):
    stderr = results["child_left_running"].stderr
    pid = int(stderr.split("CHILDPID")[1].split()[0])
    deadline = time.time() + 3
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the child the program left behind is still running"
    if CAPS.uid_drop:
        uids = set(range(results["_uid_base"], results["_uid_base"] + WORKERS))
        left = [e.name for e in os.scandir("/proc") if e.name.isdigit() and e.stat().st_uid in uids and _alive(int(e.name))]
        assert not left, f"sandbox processes left: {left}"


def test_plain_program_passes_and_nonce_is_fresh():
    with Sandbox(workers=1) as sb:
        a, b = python_program("assert True", Limits(timeout=5)), python_program("assert True", Limits(timeout=5))
        assert a.sentinel != b.sentinel
        assert sb.run(a).passed


SEMANTICS = {
    "main_name": "print(__name__, __file__.endswith('main.py'))",
    "argv": "import sys; print(sys.argv[0].endswith('main.py'), sys.flags.isolated)",
    "exit_code": "raise SystemExit(3)",
    "exit_message": "import sys; sys.exit('bye')",
    "exception": "def f():\n    raise KeyError('k')\nf()",
    "atexit": "import atexit\natexit.register(lambda: print('from atexit'))\nprint('body')",
    "atexit_exit": "import atexit, os\natexit.register(lambda: os._exit(7))",
    "stdin_eof": "import sys; print(repr(sys.stdin.read()))",
    "cwd_and_home": "import os; print(os.getcwd() == os.environ['HOME'], sorted(os.listdir('.')))",
    "unicode": "print('h\\u00e9llo \\u2603')",
    "recursion": "import sys; sys.setrecursionlimit(50)\ndef r(n): return r(n + 1)\nr(0)",
}


def test_zygote_runs_programs_like_a_fresh_interpreter():
    """The fast path (forked from a pre-started interpreter) gives what `python -I main.py` gives."""
    from codellama.eval.sandbox import Program, Step, sandbox_python

    py = sandbox_python()
    progs = [Program(files={"main.py": code}, steps=[Step((py, "-I", "main.py"), python_script="main.py")],
                     limits=Limits(timeout=10)) for code in SEMANTICS.values()]
    with Sandbox(workers=2) as fast, Sandbox(workers=2, use_zygote=False) as plain:
        a, b = dict(fast.map(progs)), dict(plain.map(progs))
    for i, name in enumerate(SEMANTICS):
        assert (a[i].status, a[i].returncode, a[i].stdout) == (b[i].status, b[i].returncode, b[i].stdout), name
        assert a[i].detail.split(":")[0] == b[i].detail.split(":")[0], (name, a[i].detail, b[i].detail)
    assert a[list(SEMANTICS).index("exit_code")].returncode == 3
    assert a[list(SEMANTICS).index("atexit")].stdout == "body\nfrom atexit\n"


def test_zygote_children_do_not_share_random_state():
    # (random reseeds itself after fork: os.register_at_fork; this guards that nothing undoes it)
    from codellama.eval.sandbox import Program, Step, sandbox_python

    py = sandbox_python()
    prog = Program(files={"main.py": "import random; print(random.random())"},
                   steps=[Step((py, "-I", "main.py"), python_script="main.py")], limits=Limits(timeout=10))
    with Sandbox(workers=1) as sb:
        outs = {sb.run(prog).stdout for _ in range(4)}
    assert len(outs) == 4


@needs_uid
def test_concurrent_sandboxes_do_not_kill_each_other():
    """Two harnesses at once (e.g. an eval run beside the test suite) get distinct uid blocks, so one's
    cleanup never kills the other's programs."""
    from concurrent.futures import ThreadPoolExecutor

    prog = python_program("import time\ntime.sleep(0.3)", Limits(timeout=10))
    with Sandbox(workers=2) as a, Sandbox(workers=2) as b:
        assert a.uid_base != b.uid_base
        with ThreadPoolExecutor(2) as pool:
            ra, rb = pool.map(lambda sb: [r for _, r in sb.map([prog] * 6)], (a, b))
    assert all(r.passed for r in ra + rb), [r.result for r in ra + rb if not r.passed]


@needs_uid
def test_files_left_in_shared_temporary_folders_are_removed():
    """A program's files in /tmp or /dev/shm (RAM) outlived it: a sample that wrote 60 MB there each run
    filled them sample after sample, and the slot's next program could read them."""
    code = ("import os, pathlib\n"
            "for d in ('/tmp', '/dev/shm'):\n"
            "    tag = f'{d}/codellama-sandbox-test-{os.getpid()}'\n"
            "    pathlib.Path(tag).write_bytes(b'0' * 1000)\n"
            "    os.mkdir(tag + '.d'); pathlib.Path(tag + '.d', 'x').write_text('x')\n"
            "    os.symlink('/etc/hostname', tag + '.link')\n")
    before = os.stat("/etc/hostname")
    with Sandbox(workers=1) as sb:
        assert sb.run(python_program(code, Limits(timeout=10))).passed
        left = [e.path for d in ("/tmp", "/dev/shm") if os.path.isdir(d) for e in os.scandir(d)
                if e.name.startswith("codellama-sandbox-test-")]
    assert left == []
    assert os.stat("/etc/hostname") == before  # the link went, not its target


@pytest.mark.parametrize("use_zygote", [True, False])
def test_program_that_closes_its_output_runs_to_the_end(use_zygote):
    """Closing (or redirecting) stdout and stderr is not the end of a program: it was SIGKILLed the moment
    both pipes closed, and failed though it went on to exit 0."""
    from codellama.eval.sandbox import Program, Step, sandbox_python

    code = "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(0.5)\nopen('done', 'w').close()\n"
    prog = Program(files={"main.py": code}, steps=[Step((sandbox_python(), "-I", "main.py"), python_script="main.py")],
                   limits=Limits(timeout=10))
    with Sandbox(workers=1, use_zygote=use_zygote) as sb:
        res = sb.run(prog)
    assert (res.status, res.returncode) == ("passed", 0), res.result
