"""Small transfers between the host and the GPU that do not wait for the GPU.

The decode loop queues a step before it reads the previous one's tokens (engine/batching.py, "overlap"):
any transfer that waits for the device in between would stall that pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch


def to_device(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host numbers as a tensor on `device`, without waiting for the device: a plain copy from pageable
    memory first waits for the GPU stream to drain; from pinned memory the copy is queued. Small ones go
    through the device's staging buffer (PinnedStaging), others through torch's pinned memory (torch keeps
    the pinned block until the copy has run)."""
    t = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return t
    staged = staging(device).copy(t, device)
    return staged if staged is not None else t.pin_memory().to(device, non_blocking=True)


class PinnedStaging:
    """Pinned host memory made once per device and lent in chunks to small host-to-device copies.

    Fresh pinned memory (when torch's caching host allocator has no free block, it asks CUDA for more) is
    suspected of waiting for the GPU: building a sampler of 10 small tensors while the GPU was busy waited
    for it on an H200 (2026-11-30), while one decode step's copies, through blocks freed earlier, did not.
    A chunk is lent again only once the copy out of it has run."""

    CHUNK = 4096  # bytes: 512 int64 values
    CHUNKS = 256

    def __init__(self):
        self.buf = torch.empty(self.CHUNKS, self.CHUNK, dtype=torch.uint8, pin_memory=True)
        self.copied: list[torch.cuda.Event | None] = [None] * self.CHUNKS  # each chunk's last copy out
        self.next = 0
        self.lock = threading.Lock()  # two Generators may queue copies from two threads

    def copy(self, t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """t (on the host) on `device` through the next chunk; None if it does not fit or the chunk's last
        copy has not run yet (the caller copies otherwise)."""
        nbytes = t.numel() * t.element_size()
        if nbytes > self.CHUNK:
            return None
        with self.lock:
            i, event = self.next, self.copied[self.next]
            if event is not None and not event.query():
                return None
            self.next = (i + 1) % self.CHUNKS
            chunk = self.buf[i, :nbytes].view(t.dtype).view(t.shape)
            chunk.copy_(t)
            out = chunk.to(device, non_blocking=True)
            if event is None:
                event = self.copied[i] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        return out


_staging: dict[torch.device, PinnedStaging] = {}
_staging_lock = threading.Lock()


def staging(device: torch.device) -> PinnedStaging:
    """The CUDA device's staging buffer, made on first use: call it before queueing work that must not wait
    (a decoder and a token history do, when made)."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    with _staging_lock:
        if device not in _staging:
            _staging[device] = PinnedStaging()
        return _staging[device]


class HostTokens:
    """Sampled tokens on their way to the host: the copy starts now and is read later, so the device can
    run ahead (a plain .tolist() would also wait for every step queued after it)."""

    def __init__(self, tokens: torch.Tensor):
        self.event = None
        if tokens.device.type == "cuda":
            self.buf = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.buf.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            # on the copy's stream, the tokens' device's: a model on cuda:1 while cuda:0 is current read the
            # buffer before its copy ran
            self.event.record(torch.cuda.current_stream(tokens.device))
        else:
            self.buf = tokens

    def wait(self) -> list[int]:
        """The tokens, once their copy has landed (waits for the step that sampled them, not for later ones)."""
        if self.event is not None:
            self.event.synchronize()
        return self.buf.tolist()
