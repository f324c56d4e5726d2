"""One writer per output folder: `codellama eval` and `codellama train` hold a lock on the folder they write in,
so a second run started there (the same command in two terminals) is refused instead of interleaving its files
with the first's."""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path
from typing import IO

from codellama.errors import UserError

LOCK = ".lock"


def lock_folder(folder: Path, busy: str) -> IO[str]:
    """Hold an exclusive lock on folder/.lock until the returned file is closed (or the process ends); a
    UserError saying `busy` while another process holds it. A POSIX record lock: per process, so one process
    may take it again (a test's second Trainer). On a filesystem without locks the folder goes unguarded."""
    folder.mkdir(parents=True, exist_ok=True)
    held = open(folder / LOCK, "a")
    try:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            return held
        held.close()
        raise UserError(busy) from None
    return held
