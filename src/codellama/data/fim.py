"""Fill-in-the-middle as the Code Llama paper trains it (spec 4.3), laid out exactly like the inference
prompt of spec 2.3 (`codellama.prompts.infill_tokens`), so a model trained here infills with the prompts
the runtime builds.

Per document, with its own deterministic random stream (seeded by the run seed and the document's hash,
so the result does not depend on order or on the number of worker processes):
- with probability `rate` (0.9) the document is a FIM example, else it is trained left to right;
- a FIM example is SPM with probability `spm_rate` (0.5), else PSM;
- two split points are drawn independently and uniformly over the character positions 0..len(text) and
  sorted: prefix = text[:i], middle = text[i:j], suffix = text[j:];
- FIM is applied only when the transformed document fits in one context (<= max_len tokens); a longer
  document is trained left to right (document-level FIM: a FIM example is never cut across contexts).

Token layouts (BOS/EOS omitted where the tokenizer has none):
    left to right: [BOS] + encode(text) + [EOS]
    PSM: [BOS, PRE] + encode(prefix) + [SUF] + encode_infilling(suffix) + [MID]
         + encode_infilling(middle) + [EOT, EOS]
    SPM: [BOS, PRE, SUF] + encode_infilling(suffix) + [MID]
         + encode(prefix + middle) + [EOT, EOS]
The part before the middle is token for token the inference prompt (spec 2.3): PSM exactly; SPM up to
the prefix, which at training time is encoded together with the middle (the paper: no split sub-token
at the prefix|middle boundary), while the inference prompt ends with encode(prefix). The suffix and the
middle never get SentencePiece's implicit leading space; the prefix does. In SPM with an empty prefix the
middle is encoded with encode_infilling, because the implicit space would otherwise land on the middle
(and inference decodes the generated middle with decode_infilling, which keeps such a space).

EOS after EOT: every document, FIM or not, ends with EOS, so the packed stream has one uniform document
separator, and a client that stops only at EOS (Hugging Face's default generation_config for Code Llama,
spec 2.4) still stops right after the infill. Inference stops at EOT; the EOS is one extra token per
document. (Whether Meta put EOS after EOT is not stated, spec 8.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from codellama.errors import UserError

# the kinds a document can end up as; counted in the manifest ("l2r_cut": drawn for FIM, but the packer
# found no place in the stream where one training window holds it whole; see packer.py, fits_one_window)
KINDS = ("psm", "spm", "l2r", "l2r_too_long", "l2r_cut")
FIM_KINDS = ("psm", "spm")
# a FIM example has 4 more special tokens than the left-to-right one and splits the text in 3 places;
# re-splitting can save a token or two at a boundary, never this many: a document whose left-to-right
# encoding is longer than max_len + _FIM_SLACK cannot fit as FIM, so it is not encoded a second time
_FIM_SLACK = 16


class InfillTokenizer(Protocol):
    """The part of codellama.tokenizer.Tokenizer this module needs."""

    bos_id: int | None
    eos_id: int | None
    prefix_id: int | None
    suffix_id: int | None
    middle_id: int | None
    eot_id: int | None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def encode_infilling(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class FimConfig:
    rate: float = 0.9  # probability that a document becomes a FIM example (spec 4.3)
    spm_rate: float = 0.5  # probability that a FIM example is SPM rather than PSM
    seed: int = 0

    def __post_init__(self):
        for name in ("rate", "spm_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"FIM {name.replace('_', '-')} must be between 0 and 1, got {v}")


def check_infill_tokenizer(tok: InfillTokenizer, cfg: FimConfig) -> None:
    """UserError when FIM is asked for but the tokenizer lacks the four infill pieces."""
    if cfg.rate > 0 and None in (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id):
        raise UserError(
            "the tokenizer has no infill pieces (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>), so it cannot make FIM examples: "
            "use --tokenizer codellama (Code Llama's vocabulary) or a tokenizer that has them, or pass --fim-rate 0"
        )


def _frame(tok: InfillTokenizer, body: list[int]) -> list[int]:
    head = [tok.bos_id] if tok.bos_id is not None else []
    tail = [tok.eos_id] if tok.eos_id is not None else []
    return head + body + tail


def l2r_tokens(tok: InfillTokenizer, text: str) -> list[int]:
    """A document trained left to right: [BOS] + encode(text) + [EOS]."""
    return _frame(tok, tok.encode(text))


def psm_tokens(tok: InfillTokenizer, prefix: str, middle: str, suffix: str) -> list[int]:
    body = [tok.prefix_id, *tok.encode(prefix), tok.suffix_id, *tok.encode_infilling(suffix), tok.middle_id]
    body += tok.encode_infilling(middle)
    return _frame(tok, body + [tok.eot_id])


def spm_tokens(tok: InfillTokenizer, prefix: str, middle: str, suffix: str) -> list[int]:
    body = [tok.prefix_id, tok.suffix_id, *tok.encode_infilling(suffix), tok.middle_id]
    # prefix and middle encoded as one string; with no prefix the middle must not get the implicit space
    body += tok.encode(prefix + middle) if prefix else tok.encode_infilling(middle)
    return _frame(tok, body + [tok.eot_id])


def split_points(rng: random.Random, n: int) -> tuple[int, int]:
    """Two character positions drawn independently and uniformly from 0..n, sorted."""
    i, j = rng.randint(0, n), rng.randint(0, n)
    return (i, j) if i <= j else (j, i)


def document_rng(cfg: FimConfig, key: bytes) -> random.Random:
    """The document's own random stream: a function of the run seed and the document hash only."""
    # a str seed is hashed with SHA-512, so this is the same in every process and Python run
    return random.Random(f"{cfg.seed}:{key.hex()}")


def fits_one_window(start: int, length: int, seq_len: int) -> bool:
    """Whether tokens [start, start + length) of a split's token stream lie in one training window.

    The reader's window k is tokens k*seq_len .. k*seq_len + seq_len (shards.py: each shares its last token
    with the next). The paper applies FIM only to documents that no context boundary cuts (its 2.3): the
    `<MID>` half of a cut example would be learned without the prefix and suffix it continues.
    """
    first_window = start // seq_len
    return start + length - 1 <= first_window * seq_len + seq_len


def encode_document(
    tok: InfillTokenizer, text: str, cfg: FimConfig, max_len: int, key: bytes
) -> tuple[list[int], str]:
    """Tokens of one document and its kind ("psm", "spm", "l2r" or "l2r_too_long").

    `max_len` is the context length (seq_len): a FIM example longer than that is trained left to right
    instead. `key` identifies the document (its content hash) and seeds its random choices. Each
    document is tokenised once, except one that turns out too long after its FIM encoding.
    """
    rng = document_rng(cfg, key)
    if rng.random() >= cfg.rate:
        return l2r_tokens(tok, text), "l2r"
    spm = rng.random() < cfg.spm_rate
    i, j = split_points(rng, len(text))
    l2r = None
    if len(text) > 2 * max_len:  # probably too long (> 2 characters a token): check the cheap way first
        l2r = l2r_tokens(tok, text)
        if len(l2r) > max_len + _FIM_SLACK:
            return l2r, "l2r_too_long"
    prefix, middle, suffix = text[:i], text[i:j], text[j:]
    tokens = spm_tokens(tok, prefix, middle, suffix) if spm else psm_tokens(tok, prefix, middle, suffix)
    if len(tokens) > max_len:
        return (l2r if l2r is not None else l2r_tokens(tok, text)), "l2r_too_long"
    return tokens, "spm" if spm else "psm"
