"""What the trainer reads: endless, deterministic streams of training examples, and their batching by rank.

Every rank holds the *same* stream and the same state; each step takes the next global batch of examples
and materialises only its own contiguous slice (the others are skipped cheaply). So the data state is a
count of examples consumed, independent of the number of ranks, and a run resumes on any world size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from codellama.errors import UserError

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer


@dataclass
class Example:
    tokens: torch.Tensor  # [T+1] int64: inputs are tokens[:-1], targets tokens[1:]
    mask: torch.Tensor | None = None  # [T] bool: which targets count in the loss (None: all)


class TokenSource(Protocol):
    """An endless, seedable stream of examples of seq_len+1 tokens, identical on every rank."""

    def next(self) -> Example: ...

    def skip(self, n: int) -> None: ...  # advance past n examples without building them

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _Permuted:
    """Visits indices 0..n-1 in a fresh seeded permutation per epoch; state = examples consumed."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.pos = n, seed, shuffle, 0
        self._epoch, self._perm = -1, None

    def take(self) -> int:
        epoch, i = divmod(self.pos, self.n)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._epoch = epoch
        self.pos += 1
        return int(self._perm[i])

    def state_dict(self) -> dict:
        return {"pos": self.pos, "epoch": self.pos // self.n, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict, source: str) -> None:
        saved = (state.get("n", self.n), state.get("seed", self.seed))  # checkpoints before they were saved: as now
        if saved != (self.n, self.seed):
            raise UserError(
                f"data state does not belong to source {source!r} as it is now ({saved[0]} examples and seed "
                f"{saved[1]} when it was saved, {self.n} and seed {self.seed} now: its file or train.seq_len "
                "changed): resume with the data, seq_len and seed the run started with, or start a new run "
                "(codellama train --no-resume or another --out)")
        self.pos = int(state["pos"])


class _PermutedSource:
    """A source that walks its examples in a seeded permutation (`self.order`): skip and resume by position."""

    order: _Permuted
    name: str

    def skip(self, n: int) -> None:
        self.order.pos += n

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state, self.name)


class InMemoryTokens(_PermutedSource):
    """A 1-D token array (list, numpy array or memmap) cut into windows of seq_len+1 at stride seq_len
    (a window's last token is the next one's first), visited in a per-epoch shuffled order."""

    def __init__(self, tokens, seq_len: int, seed: int = 0, shuffle: bool = True, name: str = "tokens"):
        self.tokens = np.asarray(tokens)
        self.seq_len, self.name = seq_len, name
        if self.tokens.ndim != 1 or self.tokens.dtype.kind not in "iu":
            raise UserError(f"corpus {name!r} must be a 1-D array of integer token ids, got shape "
                            f"{self.tokens.shape} of {self.tokens.dtype}")
        n = (len(self.tokens) - 1) // seq_len
        if n < 1:
            raise UserError(f"corpus {name!r} is empty or too short: {len(self.tokens)} tokens, need at least "
                            f"seq_len+1 = {seq_len + 1}; build a bigger corpus or lower train.seq_len")
        self.order = _Permuted(n, seed, shuffle)

    @classmethod
    def from_file(cls, path: str | Path, seq_len: int, seed: int = 0, name: str = "tokens") -> InMemoryTokens:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"token file {path} for source {name!r} does not exist")
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read {path} as a .npy token array: {e}") from None
        return cls(arr, seq_len, seed, name=name)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (a full pass, done once); UserError on a negative id."""
        if not hasattr(self, "_vocab"):
            if self.tokens.dtype.kind == "i" and self.tokens.min() < 0:
                raise UserError(f"corpus {self.name!r} holds negative token ids: it is not a token array")
            self._vocab = int(self.tokens.max()) + 1
        return self._vocab

    def next(self) -> Example:
        i = self.order.take() * self.seq_len
        return Example(torch.from_numpy(self.tokens[i : i + self.seq_len + 1].astype(np.int64)))


# ---------------------------------------------------------------- chat SFT (answers-only loss)


def answer_mask(messages: list[dict], encode_chat: Callable[[list[dict]], list[int]],
                stop_ids: set[int]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the model's chat format and, per token, whether it belongs to an
    assistant answer (the answer's text and the token that ends its turn: EOS, <|im_end|>, <step>).

    `encode_chat` is prompts.chat_tokens, which builds the prompt for the next answer, so it wants the
    conversation to end with a user turn: the whole conversation is encoded with a dummy user turn
    appended (then cut off), and answer k starts where the prompt for it, encode_chat(messages[:k]),
    stops matching, and ends at the first stop token after that.
    """
    answers = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    if not answers:
        return [], []
    msgs = list(messages[: answers[-1] + 1])
    full = encode_chat(msgs + [{"role": "user", "content": "."}])
    in_answer = [False] * len(full)
    end = 0
    for k in answers:
        prompt = encode_chat(msgs[:k])
        start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        stop = next((i for i in range(start, len(full)) if full[i] in stop_ids), None)
        if stop is None:
            raise UserError(f"cannot find where assistant message {k} ends in the chat format (no stop token)")
        in_answer[start : stop + 1] = [True] * (stop + 1 - start)
        end = stop + 1
    return full[:end], in_answer[:end]


class ChatExamples(_PermutedSource):
    """Conversations as one padded row each: tokens [T+1], loss mask on assistant answers only.

    mask[j] says whether target tokens[j+1] is an answer token. Longer conversations are truncated; rows
    are padded with `pad_id` and mask False.
    """

    def __init__(self, convs: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, seed: int = 0,
                 name: str = "chat"):
        self.convs = [c for c in convs if any(c[1][1 : seq_len + 1])]  # an answer inside the window
        if not self.convs:
            raise UserError(f"chat data {name!r} has no conversation with an assistant answer inside the first "
                            f"{seq_len} tokens")
        self.seq_len, self.pad_id, self.name = seq_len, pad_id, name
        self.order = _Permuted(len(self.convs), seed)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer: Tokenizer, seq_len: int, seed: int = 0, name: str = "chat") -> ChatExamples:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"chat file {path} for source {name!r} does not exist")
        try:
            convs = cls._read_jsonl(path, tokenizer)
        except UnicodeDecodeError as e:
            raise UserError(f"chat file {path} is not UTF-8 text ({e}): save it as UTF-8") from None
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        return cls(convs, seq_len, pad, seed, name)

    @staticmethod
    def _read_jsonl(path: Path, tokenizer: Tokenizer) -> list[tuple[list[int], list[bool]]]:
        from codellama.prompts import chat_tokens

        convs = []
        with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not JSON
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages = json.loads(line)["messages"]
                    # a message must be a dict: `"role" in m` holds for a string too (messages JSON-encoded twice)
                    assert isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                              for m in messages)
                except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                    raise UserError(f'{path}:{lineno}: expected {{"messages": [{{"role": ..., "content": ...}}]}}') \
                        from None
                try:
                    convs.append(answer_mask(messages, lambda m: chat_tokens(tokenizer, m), tokenizer.stop_ids))
                except UserError as e:
                    raise UserError(f"{path}:{lineno}: {e}") from None
        return convs

    def next(self) -> Example:
        ids, ans = self.convs[self.order.take()]
        T = self.seq_len
        ids, ans = ids[: T + 1], ans[: T + 1]
        tokens = torch.full((T + 1,), self.pad_id, dtype=torch.int64)
        tokens[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask = torch.zeros(T, dtype=torch.bool)
        mask[: len(ans) - 1] = torch.tensor(ans[1:], dtype=torch.bool)
        return Example(tokens, mask)


# ---------------------------------------------------------------- the data helper's packed shards


class ShardsSource:
    """Adapter for `codellama.data.TokenShards(path, split, seq_len, seed=, rank=, world_size=)`, the reader
    of `codellama data`'s packed shards (FIM already applied when the corpus was built). We read it unsplit
    (rank 0 of 1) so every rank sees the same stream; ranks slice it themselves (RankBatches)."""

    def __init__(self, path: str | Path, split: str, seq_len: int, seed: int = 0, fim_rate: float | None = None,
                 name: str = "shards", fim_spm_rate: float | None = None):
        from codellama.data import TokenShards

        if not Path(path).exists():
            raise UserError(f"corpus {path} for source {name!r} does not exist; build it with `codellama data`")
        self.reader = TokenShards(path, split, seq_len, seed=seed, rank=0, world_size=1)
        self.name, self.seq_len = name, seq_len
        manifest = self.reader.manifest
        self.vocab_size = manifest.get("vocab_size")  # ids are below it: checked against the model
        self.tokenizer_info = manifest.get("tokenizer") or {}
        built_fim = (manifest.get("fim") or {}).get("rate")
        if fim_rate is not None and built_fim is not None and split == "train" and abs(built_fim - fim_rate) > 1e-9:
            raise UserError(f"corpus {path} was built with FIM rate {built_fim} but the recipe asks for "
                            f"data.fim_rate = {fim_rate}: rebuild it with `codellama data --fim-rate {fim_rate}` "
                            "or change the recipe")
        built_spm = (manifest.get("fim") or {}).get("spm_rate")
        if built_fim and fim_spm_rate is not None and built_spm is not None and split == "train" \
                and abs(built_spm - fim_spm_rate) > 1e-9:  # the order is chosen at build time too
            raise UserError(f"corpus {path} was built with SPM rate {built_spm} but the recipe asks for "
                            f"data.fim_spm_rate = {fim_spm_rate}: rebuild it with `codellama data --spm-rate "
                            f"{fim_spm_rate}` or change the recipe")
        built_seq = manifest.get("seq_len")
        if built_fim and built_seq and seq_len % built_seq:  # a multiple keeps every window boundary where it was
            raise UserError(f"corpus {path} packs FIM documents for contexts of {built_seq} tokens; training at "
                            f"seq_len {seq_len} (not a multiple of it) would cut some across windows: rebuild it "
                            f"with --seq-len {seq_len}")
        self._start = self.reader.state_dict()
        self._it = iter(self.reader)
        if self._pull(allow_empty=True) is None:
            raise UserError(f"corpus {path} (split {split!r}) has no window of {seq_len + 1} tokens")
        self.reader.load_state_dict(self._start)
        self._it = iter(self.reader)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """UserError when the corpus was tokenised by another tokenizer than `tokenizer` (the model's): the
        manifest's probe ids differ (corpora built before the probe was recorded are not checked)."""
        from codellama.data.pipeline import TOKENIZER_PROBE

        probe = self.tokenizer_info.get("probe")
        if probe is not None and list(tokenizer.encode(TOKENIZER_PROBE)) != probe:
            raise UserError(f"corpus {self.reader.path} for source {self.name!r} was tokenised by another tokenizer "
                            f"({self.tokenizer_info.get('name')}, vocabulary {self.vocab_size}) than the model's: "
                            "rebuild it with `codellama data --tokenizer` naming the model's tokenizer or checkpoint")

    def _pull(self, allow_empty: bool = False):
        try:
            return next(self._it)
        except StopIteration:  # end of an epoch: the reader starts the next one on a fresh iter()
            self._it = iter(self.reader)
            try:
                return next(self._it)
            except StopIteration:
                if allow_empty:
                    return None
                raise UserError(f"corpus for source {self.name!r} is empty") from None

    def next(self) -> Example:
        w = torch.as_tensor(np.asarray(self._pull()), dtype=torch.int64)
        if w.shape != (self.seq_len + 1,):
            raise UserError(f"source {self.name!r} yields windows of {tuple(w.shape)} tokens, the recipe needs "
                            f"seq_len+1 = {self.seq_len + 1}; rebuild the shards or change train.seq_len")
        return Example(w)

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._pull()

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)
        self._it = iter(self.reader)


# ---------------------------------------------------------------- mixtures and batches


class Mixture:
    """Samples each example from one of several sources with fixed proportions (spec 4.2, 4.6).

    The choice for example i comes from a seeded generator per block of 4096 examples, so it depends only
    on (seed, i): state = examples drawn + each source's own state.
    """

    BLOCK = 4096

    def __init__(self, sources: dict[str, TokenSource], weights: dict[str, float], seed: int = 0):
        self.names = list(sources)
        self.sources = sources
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.p = w / w.sum()
        self.seed, self.pos = seed, 0
        self._block, self._choices = -1, None

    def _choose(self) -> TokenSource:
        block, i = divmod(self.pos, self.BLOCK)
        if block != self._block:
            rng = np.random.default_rng([self.seed, block, 7])
            self._choices = rng.choice(len(self.names), size=self.BLOCK, p=self.p)
            self._block = block
        self.pos += 1
        return self.sources[self.names[self._choices[i]]]

    def next(self) -> Example:
        return self._choose().next()

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._choose().skip(1)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "sources": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])
        for n, s in self.sources.items():
            s.load_state_dict(state["sources"][n])


def make_source(sources: dict[str, TokenSource], weights: dict[str, float], seed: int) -> TokenSource:
    return next(iter(sources.values())) if len(sources) == 1 else Mixture(sources, weights, seed)


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T+1] int64
    mask: torch.Tensor  # [B, T] bool


class RankBatches:
    """Cuts the shared stream into global batches and keeps this rank's contiguous slice of each."""

    def __init__(self, source: TokenSource, global_batch: int, rank: int = 0, world_size: int = 1):
        assert global_batch % world_size == 0
        self.source, self.G, self.rank = source, global_batch, rank
        self.L = global_batch // world_size

    def next_batch(self) -> Batch:
        lo = self.rank * self.L
        self.source.skip(lo)
        examples = [self.source.next() for _ in range(self.L)]
        self.source.skip(self.G - lo - self.L)
        tokens = torch.stack([e.tokens for e in examples])  # [L, T+1]
        T = tokens.shape[1] - 1
        mask = torch.stack([e.mask if e.mask is not None else torch.ones(T, dtype=torch.bool) for e in examples])
        return Batch(tokens, mask)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
