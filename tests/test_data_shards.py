"""Token shards: writing, reading back, packing into windows, the resumable rank-split iterator."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from codellama.data.shards import (
    ShardWriter,
    TokenShards,
    _BlockPermutation,
    build_manifest,
    read_manifest,
    token_dtype,
    write_manifest,
)
from codellama.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"


def write_corpus(out: Path, docs: dict[str, list[np.ndarray]], vocab: int, seq_len: int, shard_tokens: int) -> None:
    writers = {}
    for split, ds in docs.items():
        w = writers[split] = ShardWriter(out / split, token_dtype(vocab), shard_tokens=shard_tokens)
        for d in ds:
            w.add(d)
    write_manifest(out, build_manifest(writers, vocab_size=vocab, seq_len=seq_len))


@pytest.fixture
def corpus(tmp_path):
    """Documents of unique consecutive ids (so a window's first token names it), several shards."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=120)
    stream = np.arange(int(lengths.sum()), dtype=np.int64)
    docs = np.split(stream, np.cumsum(lengths)[:-1])
    write_corpus(tmp_path, {"train": docs[:100], "val": docs[100:]}, vocab=32016, seq_len=16, shard_tokens=500)
    return tmp_path, docs


def test_dtype_by_vocab():
    assert token_dtype(32016) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128256) == np.uint32


def test_shards_round_trip(corpus):
    out, docs = corpus
    m = read_manifest(out)
    train = m["splits"]["train"]
    assert m["dtype"] == "uint16" and m["seq_len"] == 16 and m["vocab_size"] == 32016
    assert len(train["shards"]) > 3 and train["docs"] == 100 and train["tokens"] == sum(map(len, docs[:100]))
    got = []
    for s in train["shards"]:
        tokens = np.fromfile(out / "train" / f"{s['name']}.bin", dtype=np.uint16)
        offsets = np.load(out / "train" / f"{s['name']}.idx")
        assert s["tokens"] == len(tokens) <= 500 and s["docs"] == len(offsets) - 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        got += [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert len(got) == 100 and all(np.array_equal(g, d) for g, d in zip(got, docs))
    assert not list(out.rglob("*.tmp"))


def test_uint32_round_trip(tmp_path):
    docs = [np.array([1, 70000, 128255]), np.array([5, 2])]
    write_corpus(tmp_path, {"train": docs, "val": []}, vocab=128256, seq_len=2, shard_tokens=100)
    ds = TokenShards(tmp_path, "train")
    assert ds.dtype == np.uint32 and list(ds.tokens(0, 5)) == [1, 70000, 128255, 5, 2]
    assert len(TokenShards(tmp_path, "val")) == 0


def test_windows_pack_the_stream(corpus):
    out, docs = corpus
    stream = np.concatenate(docs[:100])
    ds = TokenShards(out, "train", shuffle=False)
    assert len(ds) == (len(stream) - 1) // 16
    for k in range(len(ds)):  # crosses shard boundaries
        assert np.array_equal(ds.window(k), stream[k * 16 : k * 16 + 17])
    assert [int(next(ds)[0]) for _ in range(3)] == [0, 16, 32]
    assert TokenShards(out, "train", seq_len=8).window(1)[0] == 8
    with pytest.raises(IndexError):
        ds.window(len(ds))


def test_epoch_is_a_permutation_and_epochs_differ(corpus):
    out, _ = corpus
    ds = TokenShards(out, "train", seed=5)
    n = len(ds)
    first = [int(next(ds)[0]) // 16 for _ in range(n)]
    second = [int(next(ds)[0]) // 16 for _ in range(n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second and first != list(range(n)) and ds.epoch == 1
    again = TokenShards(out, "train", seed=5)
    assert [int(next(again)[0]) // 16 for _ in range(n)] == first  # a function of the seed only


def test_block_permutation():
    for shuffle in (True, False):
        p = _BlockPermutation(50, seed=1, epoch=2, shuffle=shuffle, block=7)
        got = [p[k] for k in range(50)]
        assert sorted(got) == list(range(50)) and (got != list(range(50))) == shuffle


def test_state_round_trip(corpus):
    out, _ = corpus
    ds = TokenShards(out, "train", seed=2, rank=1, world_size=2)
    for _ in range(len(ds) // 2 - 3):
        next(ds)
    state = json.loads(json.dumps(ds.state_dict()))  # as a checkpoint would store it
    expected = ds.next_batch(8)  # runs into the next epoch
    assert ds.epoch == 1
    resumed = TokenShards(out, "train", seed=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.next_batch(8), expected)
    with pytest.raises(UserError, match=r"does not belong to corpus .*seed 2 when it was saved, \d+ and seed 3 now"):
        TokenShards(out, "train", seed=3).load_state_dict(state)


def test_skip_equals_reading(corpus):
    out, _ = corpus
    for n in (0, 1, 5, 40, 41, 200):
        a, b = (TokenShards(out, "train", seed=1, rank=1, world_size=2) for _ in range(2))
        for _ in range(3):
            next(a), next(b)
        for _ in range(n):
            next(a)
        b.skip(n)
        assert a.state_dict() == b.state_dict() and (a.epoch, a.position) == (b.epoch, b.position), n
        assert np.array_equal(next(a), next(b))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_split_disjoint_and_covering(corpus, world):
    out, _ = corpus
    n = len(TokenShards(out, "train"))
    taken = []
    for r in range(world):
        ds = TokenShards(out, "train", seed=7, rank=r, world_size=world)
        taken.append([int(next(ds)[0]) // 16 for _ in range(ds.windows_per_rank)])
        assert ds.epoch == 0 and len(taken[-1]) == n // world
    flat = [k for t in taken for k in t]
    assert len(set(flat)) == len(flat) == n - n % world  # disjoint, and only the remainder is skipped
    # the ranks together visit the single-rank order, round robin
    one = TokenShards(out, "train", seed=7)
    order = [int(next(one)[0]) // 16 for _ in range(n - n % world)]
    assert [taken[i % world][i // world] for i in range(len(flat))] == order


def test_resume_on_another_world_size(corpus):
    out, _ = corpus
    one = TokenShards(out, "train", seed=4)
    order = [int(next(one)[0]) // 16 for _ in range(24)]
    two = [TokenShards(out, "train", seed=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # 12 windows consumed globally
        for ds in two:
            next(ds)
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["consumed"] == 12
    three = [TokenShards(out, "train", seed=4, rank=r, world_size=3) for r in range(3)]
    for ds in three:
        ds.load_state_dict(state)
    got = [int(next(three[i % 3])[0]) // 16 for i in range(12)]
    assert got == order[12:24]


def test_bad_inputs(corpus, tmp_path):
    out, _ = corpus
    with pytest.raises(UserError, match="not a finished token corpus"):
        TokenShards(tmp_path / "nothing")
    with pytest.raises(UserError, match="unknown split"):
        TokenShards(out, "test")
    with pytest.raises(UserError, match="outside world size"):
        TokenShards(out, rank=2, world_size=2)
    with pytest.raises(UserError, match="too few"):
        next(TokenShards(out, "val", seq_len=10**6))
    (out / "train" / "shard_00001.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="wrong size"):
        TokenShards(out)


def test_disk_full_removes_partial_shard(tmp_path):
    """A real write error from the OS (file-size limit, EFBIG): UserError, no partial shard left."""
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        import numpy as np
        from codellama.data.shards import ShardWriter
        from codellama.errors import UserError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        w = ShardWriter({str(tmp_path)!r}, np.uint16, shard_tokens=20_000)
        try:
            for i in range(30):  # shard 0: 20 documents (40 kB), shard 1: 10
                w.add(np.arange(1000))
            w.add(np.arange(30_000))  # shard 2 alone: 60 kB, over the 50 kB limit
            w.close()
        except UserError as e:
            print("USERERROR", e)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "USERERROR out of disk space" in res.stdout, res.stdout + res.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    # the complete shards stay; nothing partial or temporary
    assert names == ["shard_00000.bin", "shard_00000.idx", "shard_00001.bin", "shard_00001.idx"]
