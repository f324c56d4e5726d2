"""A real SentencePiece tokenizer for the data-pipeline tests, built offline in a fraction of a second.

BPE trained on the standard library's json package, byte fallback, dummy prefix on (the implicit
leading space of Llama's tokenizer), plus `☺` (used by encode_infilling, as in Meta's code) and the four
infill pieces ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>. The adapter implements the subset of the project's Tokenizer
interface (common.md) that the pipeline uses, with Meta's encode / encode_infilling / decode_infilling
(spec 2.2). When codellama.tokenizer is merged the tests can use its SentencePieceTokenizer instead.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import sentencepiece as spm

INFILL_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")


class SPTestTokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), None
        self.prefix_id, self.suffix_id, self.middle_id, self.eot_id = (self.piece_to_id(p) for p in INFILL_PIECES)
        self.step_id = None
        self.add_bos = True
        self._smiley = self.sp.piece_to_id("☺")

    @property
    def can_infill(self) -> bool:
        return None not in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)

    @property
    def stop_ids(self) -> set[int]:
        return {self.eos_id}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def encode_infilling(self, text: str) -> list[int]:
        return self.sp.encode("☺" + text)[2:]  # drop the dummy ▁ and ☺ (spec 2.2)

    def _special(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.prefix_id, self.suffix_id, self.middle_id, self.eot_id}

    def decode(self, ids: list[int]) -> str:
        special = self._special()
        return self.sp.decode([int(i) for i in ids if int(i) not in special])

    def decode_infilling(self, ids: list[int]) -> str:
        special = self._special()
        return self.sp.decode([self._smiley] + [int(i) for i in ids if int(i) not in special])[1:]

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != "<unk>" else i

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def __reduce__(self):  # picklable for worker processes
        return (SPTestTokenizer, (self.model_proto,))


@functools.lru_cache(maxsize=None)
def sp_test_tokenizer(vocab_size: int = 600, infill: bool = True) -> SPTestTokenizer:
    text = "\n".join(p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py")))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=["☺", *INFILL_PIECES] if infill else ["☺"],
        character_coverage=1.0,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return SPTestTokenizer(buf.getvalue())
