"""On-disk token shards: the format `codellama data` writes and the trainer reads.

Layout of an output directory:
    manifest.json                 written last, atomically; its presence means the corpus is complete
    train/shard_00000.bin ...     raw token ids, little-endian, dtype uint16 (vocab <= 65536) or uint32
    train/shard_00000.idx ...     npy (int64, n_docs + 1): offsets[k] = first token of document k in the
                                  shard, offsets[-1] = tokens in the shard
    val/...                       the same for the validation split
    decontam_report.jsonl         what decontamination dropped (optional)
Documents are stored whole, each framed by the FIM transform (fim.py: starts with BOS, ends with EOS).
The manifest lists the shards of each split with their token and document counts, plus the tokenizer's
vocab size and special ids, seq_len, the FIM settings and every pipeline count.

Reading: `TokenShards(path, split="train", seq_len=None, *, seed=0, rank=0, world_size=1, shuffle=True)`
packs the split's token stream (all shards concatenated in order, documents back to back) into windows
of seq_len + 1 tokens: window k = stream[k*seq_len : k*seq_len + seq_len + 1] (consecutive windows
share one token, so every token after the first is a target exactly once; inputs = w[:-1],
targets = w[1:]). seq_len defaults to the manifest's, the one the corpus was packed for: no FIM example
crosses a window boundary there (or at a multiple of it); read with another and some do.
    len(ds)                  number of windows in the split (all ranks together)
    ds.window(k)             window k as np.int64 [seq_len + 1]; stateless random access
    iter(ds) / next(it)      this rank's windows, forever, epoch after epoch (np.int64 [seq_len + 1])
    ds.next_batch(B)         np.int64 [B, seq_len + 1]: the next B windows of this rank
    ds.skip(n)               advance past n windows of this rank without reading them
    ds.state_dict()          {"epoch", "consumed", "seed", "n_windows"}; load_state_dict(state)
    ds.epoch, ds.position    where this rank is (position = windows this rank took in this epoch)
Order: each epoch visits a permutation of all windows (shuffle=False: 0, 1, 2, ...), a function of
(seed, epoch) only: blocks of 65,536 consecutive windows in random order, each block shuffled inside
(one block in memory, and reads stay local). The permutation is split round robin across ranks: rank r takes entries
r, r + W, r + 2W, ... (W = world_size), and every rank takes len // W per epoch (the remainder of fewer
than W windows is skipped in that epoch), so ranks stay in lockstep and are disjoint.
The state counts windows consumed by all ranks together ("consumed" = position * W), so a run resumes
with any number of ranks: with the new W each rank restarts at consumed // W (rounded down to a
multiple of W; at most W - 1 windows are then seen twice). The iterator keeps no prefetch buffer: the
state is exact after every window it returned. Memory: O(number of shards) plus one shuffle block.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from codellama.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_SHUFFLE_BLOCK = 1 << 16  # windows per shuffle block: bounds the reader's memory for any corpus size


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


class ShardWriter:
    """Appends documents (token lists) to the shards of one split, streaming.

    At most `shard_tokens` tokens per shard (a document longer than that gets a shard of its own);
    tokens go straight to the open `.bin.tmp` file, so memory is bounded by one document plus the
    offsets of the current shard. A shard becomes visible (renamed from .tmp) only once complete.
    Running out of disk removes the partial shard and raises UserError.
    """

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int = 1 << 28):
        self.dir = Path(directory)
        self.dtype = np.dtype(dtype)
        self.max_id = np.iinfo(self.dtype).max
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []  # finished shards: name, tokens, docs
        self._file = None
        self._offsets: list[int] = []
        self._n = 0
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def n_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._n

    @property
    def n_docs(self) -> int:
        return sum(s["docs"] for s in self.shards) + len(self._offsets)

    def _tmp(self, suffix: str) -> Path:
        return self.dir / f"{shard_name(len(self.shards))}{suffix}.tmp"

    def add(self, tokens: list[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > self.max_id):
            raise ValueError(f"token id out of range for {self.dtype}: {arr.min()}..{arr.max()}")
        if self._file is not None and self._n and self._n + arr.size > self.shard_tokens:
            self._finish()
        if self._file is None:
            self._file = self._guard(lambda: open(self._tmp(".bin"), "wb"))
        self._offsets.append(self._n)
        self._guard(lambda: self._file.write(arr.astype(self.dtype, copy=False).tobytes()))
        self._n += arr.size

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns the list of shards (name, tokens, docs)."""
        if self._file is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Remove the shard being written (after an error)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        for suffix in (".bin", ".idx"):
            self._tmp(suffix).unlink(missing_ok=True)

    def _finish(self) -> None:
        name = shard_name(len(self.shards))
        offsets = np.asarray(self._offsets + [self._n], dtype=np.int64)

        def write_index():
            with open(self._tmp(".idx"), "wb") as f:  # file object: np.save must not append ".npy"
                np.save(f, offsets)
                f.flush()
                os.fsync(f.fileno())

        def close_bin():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

        self._guard(close_bin)
        self._guard(write_index)
        os.replace(self._tmp(".idx"), self.dir / f"{name}.idx")
        os.replace(self._tmp(".bin"), self.dir / f"{name}.bin")
        self.shards.append({"name": name, "tokens": int(self._n), "docs": len(self._offsets)})
        self._file, self._offsets, self._n = None, [], 0

    def _guard(self, fn):
        """Run a file operation; on a full disk clean up the partial shard and raise UserError."""
        try:
            return fn()
        except OSError as e:
            self.abort()
            if e.errno in _DISK_FULL:
                raise UserError(
                    f"out of disk space while writing shards in {self.dir} ({os.strerror(e.errno)}): "
                    "free some space or pass --out on a larger disk; the partial shard was removed"
                ) from None
            raise UserError(f"cannot write shards in {self.dir}: {e}") from None


def build_manifest(
    writers: dict[str, ShardWriter], *, vocab_size: int, seq_len: int, **extra: Any
) -> dict[str, Any]:
    """The manifest's fixed part (format, dtype, shards per split) plus any pipeline counts in `extra`."""
    dtypes = {w.dtype.name for w in writers.values()}
    assert len(dtypes) == 1, dtypes
    return {
        "format": "codellama-tokens",
        "version": FORMAT_VERSION,
        "dtype": dtypes.pop(),
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "splits": {
            name: {"tokens": w.n_tokens, "docs": w.n_docs, "shards": w.close()} for name, w in writers.items()
        },
        **extra,
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (tmp file + rename), after every shard is in place."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e}") from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST if path.is_dir() else path
    if not mpath.is_file():
        raise UserError(
            f"{path} is not a finished token corpus (no {MANIFEST}); build one with `codellama data --out {path} ...`"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {mpath}: {e}") from None
    if manifest.get("format") != "codellama-tokens" or manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{mpath} is not a codellama token manifest of version {FORMAT_VERSION}")
    return manifest


class _BlockPermutation:
    """A permutation of range(n) built from a shuffled order of blocks and a shuffled order inside each
    block, both drawn from (seed, epoch): random enough for training, and only one block in memory."""

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool, block: int = _SHUFFLE_BLOCK):
        self.n, self.seed, self.epoch, self.shuffle, self.block = n, seed, epoch, shuffle, block
        n_blocks = -(-n // block)
        rng = np.random.default_rng([seed, epoch, 0])
        self.order = rng.permutation(n_blocks) if shuffle else np.arange(n_blocks)
        # the last block may be short: where each block of `order` starts in the epoch's sequence
        sizes = np.minimum(block, n - self.order * block)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._cached: tuple[int, np.ndarray] | None = None

    def __getitem__(self, k: int) -> int:
        slot = k // self.block if self.starts[k // self.block] <= k < self.starts[k // self.block + 1] else None
        if slot is None:  # only after the short block has gone by
            slot = int(np.searchsorted(self.starts, k, side="right")) - 1
        b = int(self.order[slot])
        i = k - int(self.starts[slot])
        if not self.shuffle:
            return b * self.block + i
        if self._cached is None or self._cached[0] != b:
            size = min(self.block, self.n - b * self.block)
            self._cached = (b, np.random.default_rng([self.seed, self.epoch, 1, b]).permutation(size))
        return b * self.block + int(self._cached[1][i])


class TokenShards:
    """Reader of one split, packed into windows of seq_len + 1 tokens. See the module docstring."""

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        seq_len: int | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.split = split
        self.seq_len = int(seq_len or self.manifest["seq_len"])
        if self.seq_len < 1:
            raise UserError(f"seq_len must be positive, got {self.seq_len}")
        self.vocab_size = int(self.manifest["vocab_size"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        shards = self.manifest["splits"][split]["shards"]
        self._maps: list[np.memmap] = []
        for s in shards:
            f = self.path / split / f"{s['name']}.bin"
            if not f.is_file() or f.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise UserError(f"shard {f} is missing or has the wrong size: rebuild the corpus with `codellama data`")
            self._maps.append(np.memmap(f, dtype=self.dtype, mode="r"))
        # starts[i] = position of shard i in the split's stream
        self._starts = np.cumsum([0] + [s["tokens"] for s in shards], dtype=np.int64)
        self.n_tokens = int(self._starts[-1])
        self._n_windows = max(0, (self.n_tokens - 1) // self.seq_len)
        self.epoch = 0
        self.position = 0
        self._perm: _BlockPermutation | None = None

    def __len__(self) -> int:
        return self._n_windows

    @property
    def windows_per_rank(self) -> int:
        return self._n_windows // self.world_size

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int64, across shard boundaries."""
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - int(self._starts[i])
            hi = min(stop, int(self._starts[i + 1])) - int(self._starts[i])
            out[pos - start : pos - start + hi - lo] = self._maps[i][lo:hi]
            pos += hi - lo
            i += 1
        return out

    def window(self, k: int) -> np.ndarray:
        """Window k: np.int64 [seq_len + 1]."""
        if not 0 <= k < self._n_windows:
            raise IndexError(f"window {k} out of range 0..{self._n_windows - 1}")
        return self.tokens(k * self.seq_len, k * self.seq_len + self.seq_len + 1)

    def _index(self) -> int:
        """Window index of this rank's next sample."""
        if self._perm is None or self._perm.epoch != self.epoch:
            self._perm = _BlockPermutation(self._n_windows, self.seed, self.epoch, self.shuffle)
        return self._perm[self.position * self.world_size + self.rank]

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.windows_per_rank == 0:
            hint = " or a larger --val-fraction" if self.split == "val" else ""
            raise UserError(
                f"split {self.split!r} of {self.path} has {self.n_tokens} tokens: too few for one window of "
                f"{self.seq_len + 1} tokens per rank on {self.world_size} rank(s); use more data{hint} or a "
                "shorter seq_len"
            )
        if self.position >= self.windows_per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        w = self.window(self._index())
        self.position += 1
        return w

    def skip(self, n: int) -> None:
        """Advance past this rank's next n windows without reading them (same state as n next() calls)."""
        if n <= 0:
            return
        per = self.windows_per_rank
        if per == 0:
            next(self)  # raises the UserError
        g = self.epoch * per + self.position + n  # windows this rank has taken since epoch 0
        # next() rolls over to a new epoch lazily, so after a read position is in 1..per
        self.epoch, self.position = (g - 1) // per, (g - 1) % per + 1

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next batch_size windows of this rank: np.int64 [batch_size, seq_len + 1]."""
        return np.stack([next(self) for _ in range(batch_size)])

    def state_dict(self) -> dict[str, int]:
        # rank-independent (all ranks are in lockstep), so it can be saved once and loaded by any world size
        return {
            "epoch": self.epoch,
            "consumed": self.position * self.world_size,
            "seed": self.seed,
            "n_windows": self._n_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = (state.get("n_windows", self._n_windows), state.get("seed", self.seed))
        if saved != (self._n_windows, self.seed):
            raise UserError(
                f"data state does not belong to corpus {self.path} (split {self.split!r}: {saved[0]} windows of "
                f"{self.seq_len + 1} tokens and seed {saved[1]} when it was saved, {self._n_windows} and seed "
                f"{self.seed} now; was the corpus rebuilt?): resume with the corpus, seq_len and seed the run "
                "started with, or start a new run (codellama train --no-resume or another --out)"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["consumed"]) // self.world_size
