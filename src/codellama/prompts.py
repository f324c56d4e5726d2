"""Prompt layouts as token ids: infilling (PSM/SPM, spec 2.3), Code Llama Instruct chat (`[INST]`/<<SYS>>,
spec 3.1), the 70B Instruct `Source:`/`<step>` turns (spec 3.2), and a checkpoint's own jinja2 template.

Everything here follows Meta's llama/generation.py token for token: BOS first, the prefix encoded with
SentencePiece's implicit leading space, the suffix without it, one BOS/EOS pair per completed chat turn.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from codellama.errors import UserError
from codellama.tokenizer import SentencePieceTokenizer, Tokenizer

FILL_ME = "<FILL_ME>"
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


# instruct_tokens as a Jinja chat template, for the checkpoints we write (transformers, vLLM and llama.cpp's
# --jinja chat through the template). Meta encodes each turn on its own, so each starts with SentencePiece's
# implicit space (<s> ▁[INST]). Rendered to one string and tokenized, that space comes from the tokenizer
# after a special token in llama.cpp (and transformers 4), not in transformers 5's CodeLlamaTokenizer; so
# Hugging Face exports write it (INSTRUCT_TEMPLATE: transformers 5 gives exactly instruct_tokens' ids) and
# GGUF exports do not (INSTRUCT_TEMPLATE_GGUF, the Hub template's "<s>[INST]": llama.cpp gives them). We
# chat with either through instruct_tokens (chat_format).
INSTRUCT_TEMPLATE = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else none -%}"
    "{%- for m in (messages[1:] if system is not none else messages) -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
    "{{ raise_exception('roles must alternate user, assistant, user, ... (after an optional system message)') }}"
    "{%- endif -%}"
    "{%- set text = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ m['content'] if loop.first and system is not none "
    "else m['content'] -%}"
    "{%- if m['role'] == 'user' -%}{{ bos_token ~ ' [INST] ' ~ text | trim ~ ' [/INST]' }}"
    "{%- else -%}{{ ' ' ~ text | trim ~ ' ' ~ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
INSTRUCT_TEMPLATE_GGUF = INSTRUCT_TEMPLATE.replace("bos_token ~ ' [INST] '", "bos_token ~ '[INST] '")

# step_tokens as a Jinja chat template, written into exports of a tokenizer with <step> (70B Instruct, which
# transformers and vLLM can only chat with through a template). transformers 5's CodeLlamaTokenizer adds no
# leading space after a special token (<s>, <step>), so the template writes the one Meta's separate encode of
# each turn gives ("  Source": ▁ ▁Source): tokenized by transformers 5, it gives exactly step_tokens' ids.
# (transformers 4 prepends a space to every piece after a special token, so it reads one ▁ more per turn.)
# It inserts Meta's empty system message, which the Hub's 70B template does not.
STEP_TEMPLATE = (
    "{%- set dialog = messages if messages[0]['role'] == 'system' "
    "else [{'role': 'system', 'content': ''}] + messages -%}"
    "{%- for m in dialog[1:] -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
    "{{ raise_exception('roles must alternate user, assistant, user, ... (after an optional system message)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}"
    "{%- for m in dialog -%}"
    "{{ '  Source: ' ~ m['role'] | trim }}"
    "{%- if m['destination'] is defined and m['destination'] is not none -%}"
    "{{ '\\nDestination: ' ~ m['destination'] | string | trim }}"
    "{%- endif -%}"
    "{%- if m['content'] -%}{{ ' \\n\\n ' ~ m['content'] | trim }}{%- endif -%}"
    "{{ '<step>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '  Source: assistant\\nDestination: user \\n\\n ' }}{%- endif -%}"
)
# Meta refuses messages containing these (llama/generation.py SPECIAL_TAGS)
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")

CANNOT_INFILL = ("this model's vocabulary has no infilling tokens (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>), so it cannot "
                 "fill in the middle. Use Code Llama 7B or 13B (base or Instruct) or 70B; Code Llama - Python, "
                 "the 34B models and SmolLM2 cannot infill (use plain completion with them)")

Message = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------
# Infilling
# ---------------------------------------------------------------------------------------------------------
def infill_tokens(tok: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """Meta's infilling_prompt_tokens. PSM: <s> ▁<PRE> prefix ▁<SUF> suffix ▁<MID>;
    SPM (suffix_first): <s> ▁<PRE> ▁<SUF> suffix ▁<MID> prefix. The model then writes the middle and ▁<EOT>."""
    if not tok.can_infill:
        raise UserError(CANNOT_INFILL)
    return infill_layout(tok, tok.encode(prefix), tok.encode_infilling(suffix), suffix_first)


def infill_layout(tok: Tokenizer, prefix: list[int], suffix: list[int], suffix_first: bool = False) -> list[int]:
    """infill_tokens' layout of an encoded prefix and suffix (for a caller that cuts them first)."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    pre, suf, mid = tok.prefix_id, tok.suffix_id, tok.middle_id
    if suffix_first:
        return bos + [pre, suf] + suffix + [mid] + prefix
    return bos + [pre] + prefix + [suf] + suffix + [mid]


def split_fill_me(text: str) -> tuple[str, str]:
    """(prefix, suffix) around the one `<FILL_ME>` marker in `text`."""
    n = text.count(FILL_ME)
    if n != 1:
        raise UserError(f"the text must contain exactly one {FILL_ME} marker where the code is to be filled in "
                        f"(found {n})")
    prefix, suffix = text.split(FILL_ME)
    return prefix, suffix


# ---------------------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------------------
def validate_dialog(messages: list[Message]) -> None:
    """An optional system message, then user/assistant alternating, starting and ending with user."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("a chat needs at least one message: [{'role': 'user', 'content': '...'}]")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise UserError("the chat has only a system message; add a user message after it")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            where = i + (len(messages) - len(turns))
            raise UserError(f"message {where} has role {m['role']!r} where {want!r} was expected: after an "
                            "optional first 'system' message, roles must alternate user/assistant")
    if turns[-1]["role"] != "user":
        raise UserError("the last message must be from the user (the model answers it)")


def _refuse_tags(messages: list[Message], tags: tuple[str, ...] | set[str]) -> None:
    for i, m in enumerate(messages):
        found = [t for t in tags if t and t in m["content"]]
        if found:
            raise UserError(f"message {i} contains the special tag(s) {', '.join(sorted(found))}, which the prompt "
                            "format uses itself; special tags are not allowed as part of the prompt")


def instruct_tokens(tok: Tokenizer, messages: list[Message]) -> list[int]:
    """Code Llama Instruct 7B/13B/34B (Meta's chat_completion): per completed turn
    <s>[INST] {user} [/INST] {assistant} </s>, then <s>[INST] {user} [/INST]; a system message is folded
    into the first user message as <<SYS>>\\n{system}\\n<</SYS>>\\n\\n."""
    validate_dialog(messages)
    _refuse_tags(messages, SPECIAL_TAGS)
    dialog = list(messages)
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += tok.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                          bos=True, eos=True)
    ids += tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids


def step_tokens(tok: Tokenizer, messages: list[Message]) -> list[int]:
    """Code Llama 70B Instruct (Meta's dialog_prompt_tokens): <s>, then per message
    encode(" Source: {role}[\\nDestination: {dest}]") + encode("\\n\\n {content}") + <step>, then
    encode(" Source: assistant\\nDestination: user") + encode("\\n\\n "). An empty system message is
    inserted when there is none, as Meta does."""
    if tok.step_id is None:
        raise UserError("this tokenizer has no <step> piece: the Source/Destination format is Code Llama 70B "
                        "Instruct's only")
    validate_dialog(messages)
    _refuse_tags(messages, SPECIAL_TAGS)
    dialog = list(messages)
    if dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": ""}] + dialog
    ids = [tok.bos_id] if tok.bos_id is not None else []
    for m in dialog:
        headers = [f"Source: {m['role'].strip()}"]
        if m.get("destination") is not None:
            headers.append(f"Destination: {str(m['destination']).strip()}")
        ids += tok.encode(" " + "\n".join(headers))
        if m["content"]:
            ids += tok.encode("\n\n " + m["content"].strip())
        ids.append(tok.step_id)
    ids += tok.encode(" " + "\n".join(["Source: assistant", "Destination: user"]))
    ids += tok.encode("\n\n ")
    return ids


def _special_texts(tok: Tokenizer) -> dict[str, int]:
    """Texts of the tokenizer's special tokens (BOS/EOS, control and added special tokens) -> id."""
    if isinstance(tok, SentencePieceTokenizer):
        ids = {i for i in range(tok.vocab_size) if tok.sp.is_control(i)}
        ids |= {i for i in (tok.bos_id, tok.eos_id, tok.step_id) if i is not None}
        return {tok.id_to_piece(i): i for i in ids}
    out = {tok.id_to_piece(i): i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None}
    for i, added in tok.tok.get_added_tokens_decoder().items():
        if added.special:
            out[added.content] = i
    return out


def render_chat_template(template: str, messages: list[Message], tok: Tokenizer,
                         add_generation_prompt: bool = True) -> str:
    """Render a checkpoint's jinja2 chat template the way transformers' apply_chat_template does."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise UserError(f"the model's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    piece = lambda i: tok.id_to_piece(i) if i is not None else None  # noqa: E731
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=piece(tok.bos_id) or "", eos_token=piece(tok.eos_id) or "", pad_token=piece(tok.pad_id))
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template could not be rendered: {e}") from None


def template_tokens(tok: Tokenizer, messages: list[Message]) -> list[int]:
    """The checkpoint's own chat template (SmolLM2's ChatML, or a Hub tokenizer_config.json template),
    rendered with a generation prompt, then encoded with special-token texts mapped to their ids.
    BOS is added only when the tokenizer adds one and the template did not emit it."""
    if not tok.chat_template:
        raise UserError("this tokenizer carries no chat template")
    validate_dialog(messages)
    specials = _special_texts(tok)
    tags = set(specials) | {t for t in SPECIAL_TAGS if t in tok.chat_template}
    _refuse_tags(messages, tags)
    text = render_chat_template(tok.chat_template, messages, tok)
    ids = _encode_with_specials(tok, text, specials)
    if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        ids = [tok.bos_id] + ids
    return ids


def _encode_with_specials(tok: Tokenizer, text: str, specials: dict[str, int]) -> list[int]:
    if not isinstance(tok, SentencePieceTokenizer):
        return tok.encode(text)  # tokenizers already matches added/special tokens in the text
    # SentencePiece never parses "<s>" etc. in text: split on them; each segment is encoded as Meta encodes
    # one chat turn (with the implicit leading space), so "<s>[INST] ...</s>" gives Meta's tokens.
    ids: list[int] = []
    pos = 0
    while pos < len(text):
        hits = [(text.find(s, pos), s) for s in specials if s and text.find(s, pos) >= 0]
        if not hits:
            ids += tok.encode(text[pos:])
            break
        at, s = min(hits, key=lambda h: (h[0], -len(h[1])))
        if at > pos:
            ids += tok.encode(text[pos:at])
        ids.append(specials[s])
        pos = at + len(s)
    return ids


def chat_format(tok: Tokenizer) -> str:
    """Which layout chat_tokens uses for this tokenizer: "step" (70B), "template" or "instruct". Our own
    exports' [INST] templates are written for other tokenizers' conventions; instruct_tokens builds them exactly."""
    if tok.step_id is not None:
        return "step"
    if tok.chat_template and tok.chat_template not in (INSTRUCT_TEMPLATE, INSTRUCT_TEMPLATE_GGUF):
        return "template"
    return "instruct"


def chat_tokens(tok: Tokenizer, messages: list[Message]) -> list[int]:
    """The prompt for the assistant's next turn: the 70B Source/<step> format if the vocabulary has
    <step>, else the checkpoint's chat template if it carries one, else Code Llama Instruct's [INST]."""
    fmt = chat_format(tok)
    if fmt == "step":
        return step_tokens(tok, messages)
    if fmt == "template":
        return template_tokens(tok, messages)
    return instruct_tokens(tok, messages)


def chat_stop_ids(tok: Tokenizer) -> set[int]:
    """Ids that end the assistant's turn: EOS, plus <step> (70B) or <|im_end|> (ChatML) when present."""
    return tok.stop_ids
