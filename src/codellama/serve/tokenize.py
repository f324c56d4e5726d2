"""POST /tokenize and /detokenize, in the two shapes clients send: llama.cpp server's ({"content"} -> {"tokens"},
{"tokens"} -> {"content"}) and vLLM's ({"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens"},
{"tokens"} -> {"prompt"}; /detokenize answers both keys). Clients use them to count a prompt's tokens against
the context before sending it; the ids are the ones a completion request with that text would run on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from codellama.errors import UserError
from codellama.serve.protocol import ChatMessage, OpenAIError, RequestBody, message_dicts
from codellama.serve.tokens import token_bytes

if TYPE_CHECKING:
    from fastapi import Request

    from codellama.serve.app import Server


class TokenizeRequest(RequestBody):
    model: str | None = None
    content: str | None = None  # llama.cpp's
    add_special: bool = False
    with_pieces: bool = False
    prompt: str | None = None  # vLLM's, for a completion
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None  # vLLM's, for a chat
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


async def tokenize(server: Server, request: Request) -> dict:
    from codellama.prompts import chat_tokens

    server._check_auth(request)
    body = await server._parse(request, TokenizeRequest)
    server._check_model(body.model)
    tok = server._require_tokenizer("Tokenizing")
    given = [name for name in ("content", "prompt", "messages") if getattr(body, name) is not None]
    if len(given) != 1:
        raise OpenAIError(400, "send one of content (llama.cpp's form), prompt or messages (vLLM's), got "
                          f"{', '.join(given) or 'none'}", param="content")
    if body.content is not None:
        ids = tok.encode(body.content, bos=body.add_special and tok.add_bos)
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": t, "piece": _piece(tok, t)} for t in ids]}
    if body.messages is not None:
        try:
            ids = chat_tokens(tok, message_dicts(body.messages))
        except UserError as e:
            raise OpenAIError(400, str(e), param="messages") from None
    else:
        ids = tok.encode(body.prompt, bos=body.add_special_tokens and tok.add_bos)
    strs = [tok.id_to_piece(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": server.engine.context_len, "tokens": ids, "token_strs": strs}


async def detokenize(server: Server, request: Request) -> dict:
    server._check_auth(request)
    body = await server._parse(request, DetokenizeRequest)
    server._check_model(body.model)
    tok = server._require_tokenizer("Detokenizing")
    if any(not 0 <= t < tok.vocab_size for t in body.tokens):
        raise OpenAIError(400, f"tokens must be ids of this model's vocabulary (0 to {tok.vocab_size - 1})",
                          param="tokens")
    # both servers' answers: vLLM's decodes as a completion's text is (a first word's leading space dropped),
    # llama.cpp's joins the pieces (kept)
    return {"prompt": tok.decode(body.tokens), "content": tok.decode_infilling(body.tokens)}


def _piece(tok, token: int) -> str | list[int]:
    """llama.cpp's piece: the token's text, or its bytes where they are not whole UTF-8 characters."""
    raw = token_bytes(tok, token)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return list(raw)
