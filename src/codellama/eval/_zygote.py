"""A pre-started Python that forks one child per sandboxed Python program (stdlib only; run as a script).

Starting an interpreter costs 20-40 ms, more than running a HumanEval test. The harness starts one of
these per worker slot (inside the slot's network namespace, so every child inherits it). The zygote keeps
one forked child waiting; that child takes the next request from the unix socket (the program's working
dir, script, uid, limits and environment, plus the write ends of its stdout/stderr pipes via SCM_RIGHTS),
reports its pid, closes every other descriptor, becomes a session leader, sets the resource limits, drops to the sandbox uid, and runs
the script as __main__ exactly like `python -I script` would (exit status from SystemExit, traceback on
stderr and status 1 on an exception, atexit handlers run). The zygote reaps it, reports its wait status and
forks the next one. The harness keeps all policy: timeouts, output caps and killing.
"""

import atexit
import ctypes
import json
import os
import resource
import signal
import socket
import sys
import traceback
import types

# Imported once here rather than in every child (a child is a fork: whatever it imports, it imports anew,
# ~1-5 ms per module). The usual imports of benchmark programs; harmless for those that do not use them.
PRELOAD = ("typing", "re", "math", "collections", "itertools", "functools", "heapq", "string", "hashlib",
           "random", "bisect", "fractions", "decimal", "statistics", "operator", "copy", "datetime",
           "linecache", "io", "encodings.utf_8", "dataclasses", "enum", "abc")

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _send(sock, obj):
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _child(req, out_fd, err_fd, sock):
    os.setsid()
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.closerange(3, 65536)  # the control socket, pipe copies: nothing of ours stays reachable (close_range)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    os.umask(0o077)
    lim = req["limits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    if lim.get("as"):
        resource.setrlimit(resource.RLIMIT_AS, (lim["as"], lim["as"]))
    uid = req.get("uid")
    if uid is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if hasattr(_libc, "prctl"):  # Linux: die with the zygote
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [req["script"]]
    # fresh text streams on the redirected descriptors (the zygote's own were /dev/null)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="backslashreplace")
    code = 0
    try:
        _run_main(req["script"])
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - report like the interpreter does
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - closed or broken: nothing more to say
            code = code or 120
    os._exit(code)


def _run_main(path):
    """What `python -I path` does with the script: a fresh __main__ module, the code compiled with its
    file name (so tracebacks point at it), executed in that module's namespace."""
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    with open(path, "rb") as f:
        source = f.read()
    exec(compile(source, path, "exec"), main.__dict__)


def _exit_code(e):
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    try:
        print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


def _take_request(sock):
    """(request, [out_fd, err_fd]) from the harness, or (None, []) when it has gone."""
    buf, fds = b"", []
    while not buf.endswith(b"\n"):
        msg, got, _flags, _addr = socket.recv_fds(sock, 1 << 16, 2)
        if not msg:
            return None, []
        buf += msg
        fds += got
    return json.loads(buf), fds


EXIT_HARNESS_GONE = 250


def main():
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import gc

    gc.collect()
    gc.freeze()  # children's collections skip the inherited objects: fewer copy-on-write page faults
    sock = socket.socket(fileno=int(sys.argv[1]))
    while True:
        # The next child is forked before its request arrives (while the harness is still preparing the
        # program), so the fork is off the critical path. The child reads the request itself.
        pid = os.fork()
        if pid == 0:
            try:
                if hasattr(_libc, "prctl"):
                    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                req, fds = _take_request(sock)
                if req is None:
                    os._exit(EXIT_HARNESS_GONE)
                _send(sock, {"pid": os.getpid()})
                _child(req, fds[0], fds[1], sock)
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_HARNESS_GONE:
            return
        _send(sock, {"status": status})


if __name__ == "__main__":
    main()
