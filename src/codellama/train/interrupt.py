"""Stop a training run cleanly when asked: SIGTERM (a cluster scheduler preempting the job, torchrun shutting
its workers down) or SIGINT (Ctrl-C) lets the current step finish, saves a checkpoint and stops, so the
same command resumes from there instead of from the last periodic checkpoint. A second signal stops at once
(Ctrl-C twice: KeyboardInterrupt)."""

from __future__ import annotations

import signal
import sys
import threading

import torch

from codellama.train.distributed import DistEnv, all_reduce_sum

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that turns SIGTERM and SIGINT into a request to stop after the current step."""

    def __init__(self, announce: bool = True) -> None:
        self.signal: signal.Signals | None = None  # the first signal received
        self.announce = announce  # say on stderr that the run will stop (one rank of many says it)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # asked twice: stop now
            self.__exit__()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)
        if self.announce:
            print(f"\n{self.signal.name}: stopping after this step, once its checkpoint is saved "
                  "(again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, env: DistEnv) -> bool:
        """Whether any rank was asked to stop: every rank must stop after the same step, since the checkpoint
        is saved by all of them together (one small all-reduce per step when distributed)."""
        if not env.distributed:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=env.device)
        return all_reduce_sum(flag, env).item() > 0
