"""Small transfers between the host and the GPU that do not wait for the GPU.

The decode loop queues a step before it reads the previous one's tokens (engine/batching.py, "overlap"):
any transfer that waits for the device in between would stall that pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host numbers as a tensor on `device`, without waiting for the device: a plain copy from pageable
    memory first waits for the GPU stream to drain (from pinned memory the copy is queued; torch keeps
    the pinned block until the copy has run)."""
    t = torch.tensor(list(values), dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class HostTokens:
    """Sampled tokens on their way to the host: the copy starts now and is read later, so the device can
    run ahead (a plain .tolist() would also wait for every step queued after it)."""

    def __init__(self, tokens: torch.Tensor):
        self.event = None
        if tokens.device.type == "cuda":
            self.buf = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.buf.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.buf = tokens

    def wait(self) -> list[int]:
        """The tokens, once their copy has landed (waits for the step that sampled them, not for later ones)."""
        if self.event is not None:
            self.event.synchronize()
        return self.buf.tolist()
