"""Tokens as the logprobs of a response show them: each token's text, its UTF-8 bytes, and where its text
starts in the response's text.

A token may carry only part of a character: a byte-fallback piece of SentencePiece (`<0xF0>`, Code Llama's
way to spell characters outside its vocabulary) or a byte-level BPE token holding part of a character's
bytes. Decoded alone such a token is U+FFFD, so its bytes are read from its piece instead.
"""

from __future__ import annotations

import codecs
import functools
import re

from codellama.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_text(tok: Tokenizer | None, token: int) -> str:
    """The token decoded alone, keeping the leading space SentencePiece drops from a text's first word
    ("▁c": " c"); "" for a piece decoding drops (<s>, ▁<EOT>)."""
    if tok is None:
        return str(token)
    return tok.decode_infilling([token])


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (tokenizers' ByteLevel): the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tok: Tokenizer | None, token: int) -> bytes:
    """The token's share of the UTF-8 bytes of the text (b"" for a special token decode drops)."""
    if tok is None:
        return str(token).encode()
    piece = tok.id_to_piece(token)
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    text = token_text(tok, token)
    alphabet = _byte_level_alphabet()
    if "\ufffd" in text and all(c in alphabet for c in piece):  # part of a character, in byte-level BPE
        return bytes(alphabet[c] for c in piece)
    return text.encode()


def text_offsets(pieces: list[bytes], text: str, start: int = 0) -> list[int]:
    """For tokens whose bytes are `pieces` and whose decoded text is `text` (which begins at `start` in the
    response): where each token's text starts in the response, in characters.

    A token holding part of a character's bytes is placed at that character, so the offsets never decrease
    and `response[offset:]` starts with what each token adds. `text` may differ from the decoded bytes at its
    ends: without a leading space SentencePiece adds (a prompt as the client sent it), or cut at a stop string.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars, starts = [], []
    for piece in pieces:
        starts.append(len(chars))  # the token's first byte starts or continues this character
        chars += decoder.decode(piece)
    decoded = "".join(chars) + decoder.decode(b"", final=True)
    shift = 1 if decoded == " " + text else 0  # the leading space SentencePiece adds to a text it encodes
    return [start + min(max(at - shift, 0), len(text)) for at in starts]
