"""Read and write SentencePiece `ModelProto` bytes (tokenizer.model) without the protobuf runtime.

sentencepiece ships generated protobuf code, but it only imports with one major version of the protobuf
runtime; the wire format of the few fields we touch is simple and stable, so we read/write it directly.
Field numbers are those of sentencepiece_model.proto. Unknown fields are kept verbatim, so a parse +
serialize round trip of a real tokenizer.model is byte-preserving for everything we do not edit.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
UNIGRAM, BPE = 1, 2

# ModelProto fields
_PIECES, _TRAINER, _NORMALIZER = 1, 2, 3
# NormalizerSpec fields
_N_NAME, _N_ADD_DUMMY_PREFIX, _N_REMOVE_EXTRA_WS, _N_ESCAPE_WS = 1, 3, 4, 5
# TrainerSpec fields
_T_MODEL_TYPE, _T_VOCAB_SIZE, _T_BYTE_FALLBACK = 3, 4, 35
_T_UNK_ID, _T_BOS_ID, _T_EOS_ID, _T_PAD_ID = 40, 41, 42, 43


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are encoded as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


# One field of a message: (field number, wire type, raw value). Value is int for varint, bytes otherwise.
Field = tuple[int, int, "int | bytes"]


def parse_message(buf: bytes) -> list[Field]:
    fields: list[Field] = []
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _read_varint(buf, i)
        elif wt == 1:
            val, i = buf[i : i + 8], i + 8
        elif wt == 2:
            n, i = _read_varint(buf, i)
            val, i = buf[i : i + n], i + n
        elif wt == 5:
            val, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt} (not a SentencePiece model?)")
        fields.append((num, wt, val))
    return fields


def serialize_message(fields: list[Field]) -> bytes:
    out = bytearray()
    for num, wt, val in fields:
        out += _varint(num << 3 | wt)
        if wt == 0:
            out += _varint(val)  # type: ignore[arg-type]
        elif wt == 2:
            out += _varint(len(val)) + val  # type: ignore[arg-type, operator]
        else:
            out += val  # type: ignore[operator]
    return bytes(out)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL

    def to_bytes(self) -> bytes:
        fields: list[Field] = [(1, 2, self.piece.encode("utf-8")), (2, 5, struct.pack("<f", self.score))]
        if self.type != NORMAL:  # NORMAL is the proto default and is omitted, as sentencepiece writes it
            fields.append((3, 0, self.type))
        return serialize_message(fields)

    @classmethod
    def from_bytes(cls, buf: bytes) -> "Piece":
        p = cls("")
        for num, _, val in parse_message(buf):
            if num == 1:
                p.piece = val.decode("utf-8")  # type: ignore[union-attr]
            elif num == 2:
                p.score = struct.unpack("<f", val)[0]  # type: ignore[arg-type]
            elif num == 3:
                p.type = val  # type: ignore[assignment]
        return p


@dataclass
class ModelProto:
    """The pieces plus the trainer/normalizer specs as raw field lists (edited through helpers)."""

    pieces: list[Piece] = field(default_factory=list)
    trainer: list[Field] = field(default_factory=list)
    normalizer: list[Field] = field(default_factory=list)
    other: list[Field] = field(default_factory=list)  # self_test_data, denormalizer_spec, ... kept verbatim

    @classmethod
    def from_bytes(cls, buf: bytes) -> "ModelProto":
        m = cls()
        for f in parse_message(buf):
            num, _, val = f
            if num == _PIECES:
                m.pieces.append(Piece.from_bytes(val))  # type: ignore[arg-type]
            elif num == _TRAINER:
                m.trainer = parse_message(val)  # type: ignore[arg-type]
            elif num == _NORMALIZER:
                m.normalizer = parse_message(val)  # type: ignore[arg-type]
            else:
                m.other.append(f)
        return m

    def to_bytes(self) -> bytes:
        fields: list[Field] = [(_PIECES, 2, p.to_bytes()) for p in self.pieces]
        fields.append((_TRAINER, 2, serialize_message(self.trainer)))
        fields.append((_NORMALIZER, 2, serialize_message(self.normalizer)))
        return serialize_message(fields + self.other)

    # -- spec accessors ----------------------------------------------------------------------------------
    @staticmethod
    def _get(fields: list[Field], num: int, default: int) -> int:
        for n, wt, v in reversed(fields):  # protobuf: the last occurrence wins
            if n == num and wt == 0:
                return _signed(v)  # type: ignore[arg-type]
        return default

    @staticmethod
    def _set(fields: list[Field], num: int, wt: int, value: "int | bytes") -> None:
        fields[:] = [f for f in fields if f[0] != num]
        fields.append((num, wt, value))

    @property
    def add_dummy_prefix(self) -> bool:
        return bool(self._get(self.normalizer, _N_ADD_DUMMY_PREFIX, 1))

    @add_dummy_prefix.setter
    def add_dummy_prefix(self, on: bool) -> None:
        self._set(self.normalizer, _N_ADD_DUMMY_PREFIX, 0, int(on))

    @property
    def model_type(self) -> int:
        return self._get(self.trainer, _T_MODEL_TYPE, UNIGRAM)

    @property
    def byte_fallback(self) -> bool:
        return bool(self._get(self.trainer, _T_BYTE_FALLBACK, 0))

    @property
    def is_llama_style(self) -> bool:
        """BPE with an identity normaliser that keeps runs of whitespace and escapes it as U+2581 (Llama 1/2,
        Code Llama): what a `tokenizers` BPE behind a Prepend + Replace normaliser reproduces exactly."""
        name = next((v for n, wt, v in reversed(self.normalizer) if n == _N_NAME and wt == 2), b"nmt_nfkc")
        return (self.model_type == BPE and name == b"identity" and not self._get(self.normalizer, _N_REMOVE_EXTRA_WS, 1)
                and bool(self._get(self.normalizer, _N_ESCAPE_WS, 1)))

    def special_ids(self) -> dict[str, int]:
        """unk/bos/eos/pad ids from the trainer spec (sentencepiece defaults 0/1/2/-1)."""
        t = self.trainer
        return {"unk": self._get(t, _T_UNK_ID, 0), "bos": self._get(t, _T_BOS_ID, 1),
                "eos": self._get(t, _T_EOS_ID, 2), "pad": self._get(t, _T_PAD_ID, -1)}

    def set_vocab_size(self) -> None:
        self._set(self.trainer, _T_VOCAB_SIZE, 0, len(self.pieces))


def llama_style_proto(pieces: list[Piece], unk_id: int = 0, bos_id: int = 1, eos_id: int = 2,
                      pad_id: int = -1, byte_fallback: bool = True, model_type: int = BPE) -> ModelProto:
    """A ModelProto with Llama's settings: BPE, byte fallback, identity normaliser, dummy prefix on,
    extra whitespace kept, spaces escaped as U+2581."""
    trainer: list[Field] = [
        (_T_MODEL_TYPE, 0, model_type),
        (_T_VOCAB_SIZE, 0, len(pieces)),
        (_T_BYTE_FALLBACK, 0, int(byte_fallback)),
        (_T_UNK_ID, 0, unk_id),
        (_T_BOS_ID, 0, bos_id),
        (_T_EOS_ID, 0, eos_id),
        (_T_PAD_ID, 0, pad_id & ((1 << 64) - 1)),
    ]
    normalizer: list[Field] = [
        (_N_NAME, 2, b"identity"),
        (_N_ADD_DUMMY_PREFIX, 0, 1),
        (_N_REMOVE_EXTRA_WS, 0, 0),
        (_N_ESCAPE_WS, 0, 1),
    ]
    return ModelProto(pieces=list(pieces), trainer=trainer, normalizer=normalizer)
