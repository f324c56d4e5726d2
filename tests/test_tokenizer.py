"""Tokenizers against the reference libraries: sentencepiece (Meta's own encode), transformers'
CodeLlamaTokenizer, llama.cpp for the GGUF-embedded BPE vocabulary, and the spec's Code Llama ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from codellama import spm_proto
from codellama.errors import UserError
from codellama.tokenizer import (BPETokenizer, SentencePieceTokenizer, codellama_tokenizer, load_tokenizer,
                                 save_tokenizer, tokenizer_from_gguf, write_gguf_tokenizer)
from tokenizer_fixtures import GGUF_SMOLLM2, INFILL, TRICKY, fresh_codellama_tokenizers, hf_codellama


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
    return load_tokenizer(sp_dir)


@pytest.fixture(scope="module")
def ref_sp(sp_dir):
    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


# --- SentencePiece -------------------------------------------------------------------------------------
def test_encode_decode_equal_sentencepiece(sp_tok, ref_sp):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    for s in TRICKY:
        ids = sp_tok.encode(s)
        assert ids == ref_sp.encode(s), repr(s)
        assert sp_tok.encode(s, bos=True, eos=True) == [1] + ids + [2]
        assert sp_tok.decode(ids) == ref_sp.decode(ids), repr(s)


def test_codellama_encode_equals_sentencepiece_and_meta_infilling_trick(codellama):
    """encode_infilling/decode_infilling equal Meta's "☺" trick (llama/tokenizer.py) on the real vocab."""
    ref = spm.SentencePieceProcessor(model_proto=codellama.model_proto)
    smiley = ref.piece_to_id("☺")
    assert smiley != ref.unk_id()
    for s in TRICKY + ["\n    return result\n", "☺", " ☺x"]:
        assert codellama.encode(s) == ref.encode(s), repr(s)
        ids = codellama.encode_infilling(s)
        assert ids == ref.encode("☺" + s)[2:], repr(s)
        assert codellama.decode_infilling(ids) == ref.decode([smiley] + ids)[1:], repr(s)
        # and for generated pieces that start with a space
        gen = ref.encode(s)
        assert codellama.decode_infilling(gen) == ref.decode([smiley] + gen)[1:], repr(s)


def test_infilling_equals_meta_trick_on_random_code(codellama):
    """Seeded fuzz: no-dummy-prefix encoding == Meta's encode("☺" + s)[2:], and the decodes agree."""
    import random

    ref = spm.SentencePieceProcessor(model_proto=codellama.model_proto)
    smiley = ref.piece_to_id("☺")
    alphabet = list(" \t\n\r☺aZ_()[]{}:;.,'\"#=+-*/<>!?0123456789éü中😀▁") + ["def ", "return", "    ", "self"]
    rng = random.Random(0)
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        ids = codellama.encode_infilling(s)
        assert ids == ref.encode("☺" + s)[2:], repr(s)
        gen = ref.encode(s)
        assert codellama.decode_infilling(gen) == ref.decode([smiley] + gen)[1:], repr(s)


def test_codellama_vocabulary(codellama):
    """Spec 2.1: 32016 pieces, infill ids 32007-32010, base ids, and the appended pieces' strings."""
    t = codellama
    assert (t.vocab_size, t.bos_id, t.eos_id, t.pad_id) == (32016, 1, 2, None)
    assert (t.prefix_id, t.suffix_id, t.middle_id, t.eot_id, t.step_id) == (32007, 32008, 32009, 32010, None)
    assert t.can_infill and t.add_bos
    assert t.piece_to_id("<0x0A>") == 13 and t.piece_to_id("▁") == 29871
    assert [t.id_to_piece(i) for i in (32000, 32006, 32011, 32015)] == ["▁<SU", "▁<EOT", "▁<EOT><EOT>",
                                                                       "▁" + "<EOT>" * 6]
    assert t.piece_to_id("<no such piece>") is None
    assert t.stop_ids == {2}


def test_codellama_variants(tmp_path, monkeypatch):
    try:
        py, inst70 = fresh_codellama_tokenizers(monkeypatch, tmp_path, "python", "70b-instruct")
    except UserError as e:
        pytest.skip(str(e))
    assert (tmp_path / "tokenizer-codellama-python.model").is_file()  # cached where $CODELLAMA_CACHE says
    assert py.vocab_size == 32000 and not py.can_infill and py.prefix_id is None
    assert inst70.vocab_size == 32016 and inst70.step_id == 32015 and inst70.can_infill
    assert inst70.stop_ids == {2, 32015}
    with pytest.raises(UserError, match="variant"):
        codellama_tokenizer("nope")


def test_decode_drops_specials_and_infilling_keeps_leading_space(codellama):
    t = codellama
    body = t.encode(" x = 1")  # "▁▁x" ...: the dummy prefix, then the text's own space
    assert t.decode([t.bos_id] + body + [t.eot_id, t.eos_id]) == " x = 1"  # round trip
    assert t.decode_infilling(body + [t.eot_id]) == "  x = 1"  # the dummy-prefix ▁ is kept too
    assert t.decode_infilling(t.encode_infilling(" y")) == " y"
    assert t.decode(t.encode_infilling(" y")) == "y"  # plain decode strips it: Meta's reason for the trick
    assert t.decode([t.prefix_id, t.suffix_id, t.middle_id, -1]) == ""


def test_infill_pieces_found_by_name(sp_tok):
    n = sp_tok.vocab_size
    assert [sp_tok.prefix_id, sp_tok.suffix_id, sp_tok.middle_id, sp_tok.eot_id] == list(range(n - 4, n))
    assert sp_tok.can_infill and sp_tok.step_id is None
    assert [sp_tok.id_to_piece(i) for i in range(n - 4, n)] == INFILL


def test_matches_transformers_codellama(sp_dir, sp_tok):
    """transformers' CodeLlamaTokenizer (5.x has only the `tokenizers` one) agrees with SentencePiece
    except on two documented divergences, which we do NOT follow (Meta uses SentencePiece):
    text starting with whitespace (its Metaspace(prepend_scheme="first") skips the dummy prefix there),
    and literal "<s>"/"</s>" in text (it parses them as special tokens; Meta's encode never does)."""
    hf = hf_codellama(sp_dir)
    assert (hf.prefix_id, hf.suffix_id, hf.middle_id, hf.eot_id) == (
        sp_tok.prefix_id, sp_tok.suffix_id, sp_tok.middle_id, sp_tok.eot_id)
    checked = 0
    for s in TRICKY:
        if s[:1] in (" ", "\t", "▁", "\u00a0") or "<s>" in s:
            continue
        assert sp_tok.encode(s, bos=True) == hf.encode(s), repr(s)
        assert sp_tok.decode(sp_tok.encode(s)) == hf.decode(hf.encode(s), skip_special_tokens=True), repr(s)
        checked += 1
    assert checked >= 15


def test_spm_proto_round_trip(sp_dir):
    data = (sp_dir / "tokenizer.model").read_bytes()
    proto = spm_proto.ModelProto.from_bytes(data)
    assert proto.to_bytes() == data
    assert proto.model_type == spm_proto.BPE and proto.add_dummy_prefix
    assert proto.special_ids() == {"unk": 0, "bos": 1, "eos": 2, "pad": -1}
    try:  # protobuf's own parser agrees (sentencepiece's generated code needs a matching protobuf)
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except Exception as e:
        pytest.skip(f"protobuf unavailable: {e}")
    ref = pb2.ModelProto()
    ref.ParseFromString(data)
    assert [p.piece for p in ref.pieces] == [p.piece for p in proto.pieces]
    assert [p.type for p in ref.pieces] == [p.type for p in proto.pieces]
    proto.add_dummy_prefix = False
    ref.normalizer_spec.add_dummy_prefix = False
    assert sorted(spm_proto.ModelProto.from_bytes(ref.SerializeToString()).normalizer) == sorted(proto.normalizer)


# --- BPE: SmolLM2's GGUF vocabulary ----------------------------------------------------------------------
def test_smollm2_gguf_equals_llama_cpp(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(str(GGUF_SMOLLM2), vocab_only=True, verbose=False)
    assert isinstance(smollm2, BPETokenizer)
    assert smollm2.vocab_size == ref.n_vocab() == 49152
    extra = ["x  =  1   # two  spaces", "abc   12  x", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>"]
    for s in TRICKY + extra:
        ids = smollm2.encode(s)
        assert ids == ref.tokenize(s.encode(), add_bos=False, special=True), repr(s)
        assert smollm2.decode(ids) == ref.detokenize(ids, special=False).decode(), repr(s)
        assert smollm2.encode_infilling(s) == ids  # byte-level BPE has no implicit space
    import random

    rng = random.Random(0)
    alphabet = list(" \t\n\r aZé中😀_()'\"0123456789.,:#") + ["def ", "return", "    ", "<|im_end|>"]
    for _ in range(1000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert smollm2.encode(s) == ref.tokenize(s.encode(), add_bos=False, special=True), repr(s)


def test_smollm2_specials(smollm2):
    t = smollm2
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 2)
    assert t.id_to_piece(2) == "<|im_end|>" and not t.add_bos
    assert t.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>
    assert not t.can_infill and t.step_id is None
    assert "<|im_start|>" in t.chat_template
    assert t.decode(t.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


@pytest.mark.slow
def test_smollm2_gguf_equals_transformers_gguf_loader(smollm2):
    """transformers' own GGUF tokenizer conversion, on strings where it is exact (it drops SmolLM2's
    split-digits pre-tokenizer, so whitespace before a digit differs there; llama.cpp agrees with us)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(GGUF_SMOLLM2.parent), gguf_file=GGUF_SMOLLM2.name)
    for s in TRICKY:
        if any(c.isdigit() for c in s):
            continue
        assert smollm2.encode(s) == hf.encode(s, add_special_tokens=False), repr(s)


# --- saving and loading -----------------------------------------------------------------------------------
def test_save_load_sentencepiece(tmp_path, sp_tok):
    sp_tok.chat_template = "{{ bos_token }}x"
    try:
        save_tokenizer(sp_tok, tmp_path)
    finally:
        sp_tok.chat_template = None
    again = load_tokenizer(tmp_path)
    assert again.chat_template == "{{ bos_token }}x" and again.add_bos
    for s in TRICKY:
        assert again.encode(s) == sp_tok.encode(s)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["tokenizer_class"]) == ("<s>", "</s>", "CodeLlamaTokenizer")
    hf = hf_codellama(tmp_path)  # transformers reads what we wrote
    assert hf.encode("def f(x):\n    return x") == sp_tok.encode("def f(x):\n    return x", bos=True)


@pytest.mark.parametrize("variant", ["base", "70b-instruct"])
def test_saved_codellama_tokenizer_tokenizes_in_transformers_as_sentencepiece(tmp_path, codellama, variant):
    """An export carries tokenizer.json: from tokenizer.model alone transformers 5 builds merges that split
    runs of spaces otherwise (a newline and 4 spaces before "total": 268 7827, SentencePiece 1678 3001).
    70B Instruct's too, with its user-defined <step> a special token like <s>."""
    transformers = pytest.importorskip("transformers")
    codellama = codellama if variant == "base" else codellama_tokenizer(variant)
    save_tokenizer(codellama, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    lines = (Path(json.__file__).parent / "decoder.py").read_text().splitlines()
    code = ["\n".join(lines[i:i + 6]) for i in range(len(lines))]  # each line starts a text
    # text starting with whitespace and literal <s>: transformers' documented divergences (see above)
    texts = [s for s in [*code, *TRICKY, "\n    total"] if s and s[0] not in " \t\u2581\u00a0" and "<s>" not in s]
    assert len(texts) > 80
    for s in texts:
        assert hf.encode(s) == codellama.encode(s, bos=True), repr(s)
        assert hf.decode(hf.encode(s), skip_special_tokens=True) == codellama.decode(codellama.encode(s)), repr(s)


def test_exported_tokenizer_json_decodes_as_sentencepiece_and_transformers(tmp_path, codellama):
    """Our export's tokenizer.json holds the infill pieces as ordinary pieces: read as a BPETokenizer it
    decoded ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT> as text, where the SentencePiece tokenizer and transformers'
    CodeLlamaTokenizer on the same export drop them."""
    transformers = pytest.importorskip("transformers")
    save_tokenizer(codellama, tmp_path)
    bpe = load_tokenizer(tmp_path / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(bpe, BPETokenizer) and bpe.can_infill
    t = codellama
    for ids in (t.encode("def f(x):") + [t.prefix_id, t.suffix_id, t.middle_id, t.eot_id] + t.encode(" y"),
                [t.middle_id] + t.encode_infilling(" return x") + [t.eot_id], t.encode(" <SUF> x <EOT>")):
        want = hf.decode(ids, skip_special_tokens=True)
        assert bpe.decode(ids) == t.decode(ids) == want, [t.id_to_piece(i) for i in ids]
        assert bpe.decode_infilling(ids) == t.decode_infilling(ids), [t.id_to_piece(i) for i in ids]


def test_a_fine_tunes_added_tokens_in_tokenizer_json_are_kept(tmp_path, codellama):
    """A Code Llama fine-tune that added ChatML's tokens has them in tokenizer.json only (tokenizer.model is
    the base's): the checkpoint's tokenizer is then tokenizer.json's, as transformers' is, not SentencePiece's
    without them (which split <|im_start|> into pieces). transformers' own <FILL_ME> marker alone keeps
    SentencePiece."""
    transformers = pytest.importorskip("transformers")

    def resaved(directory: Path, added: list[str]):
        save_tokenizer(codellama, directory)
        hf = transformers.AutoTokenizer.from_pretrained(str(directory))  # adds <FILL_ME> at 32016
        if added:
            hf.add_special_tokens({"additional_special_tokens": added})
        hf.save_pretrained(str(directory))
        (directory / "tokenizer.model").write_bytes(codellama.model_proto)  # the base's, as fine-tunes ship it
        return hf

    resaved(tmp_path / "plain", [])
    assert isinstance(load_tokenizer(tmp_path / "plain"), SentencePieceTokenizer)
    hf = resaved(tmp_path / "chat", ["<|im_start|>", "<|im_end|>"])
    text = "<|im_start|>user\ndef f(x): return x<|im_end|>"
    tok = load_tokenizer(tmp_path / "chat")
    assert isinstance(tok, BPETokenizer) and tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert {32017, 32018} <= set(tok.encode(text)) and tok.encode("def f(x):") == codellama.encode("def f(x):")


def test_save_load_bpe_readable_by_transformers(tmp_path, smollm2):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(smollm2, tmp_path)
    again = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token, hf.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert again.chat_template == smollm2.chat_template and not again.add_bos
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 2)
    for s in TRICKY:
        assert again.encode(s) == smollm2.encode(s) == hf.encode(s, add_special_tokens=False), repr(s)


@pytest.mark.parametrize("which", ["codellama", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_gguf_write_read_round_trip(tmp_path, which, request):
    gguf = pytest.importorskip("gguf")
    tok = request.getfixturevalue(which)
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    write_gguf_tokenizer(tok, w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    again = tokenizer_from_gguf(gguf.GGUFReader(path))
    assert type(again) is type(tok)
    assert (again.vocab_size, again.bos_id, again.eos_id, again.add_bos, again.chat_template) == (
        tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)
    assert (again.prefix_id, again.eot_id) == (tok.prefix_id, tok.eot_id)
    for s in TRICKY:
        assert again.encode(s) == tok.encode(s), repr(s)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\xff\xff garbage")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        load_tokenizer(bad)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_config_files_beside_the_tokenizer(tmp_path, sp_dir):
    """chat_template.jinja (newer transformers), named template lists and special_tokens_map.json."""
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path).chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
         "add_bos_token": False}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert tok.chat_template == "D" and not tok.add_bos
    assert tok.stop_ids == {2, 5}
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        load_tokenizer(tmp_path)
    for template in (5, [{"name": "default", "template": 5}]):  # a TypeError at the first chat
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        with pytest.raises(UserError, match="tokenizer_config.json: chat_template must be a string .*, not 5"):
            load_tokenizer(tmp_path)


def test_llama_style_tokenizer_json_infilling(tmp_path, sp_dir, sp_tok):
    """A tokenizer.json with SentencePiece-style Metaspace (what HF ships beside tokenizer.model): the
    infilling encode drops the implicit space, the infilling decode keeps the leading space."""
    hf = hf_codellama(sp_dir)
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, BPETokenizer) and tok.can_infill
    assert tok.encode("x = 1") == sp_tok.encode("x = 1")
    assert tok.encode_infilling("x = 1") == sp_tok.encode_infilling("x = 1") != sp_tok.encode("x = 1")
    middle = sp_tok.encode_infilling(" y = 2")
    assert tok.decode_infilling(middle) == " y = 2" and tok.decode(middle) == "y = 2"


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    (tmp_path / "tokenizer-codellama-base.model").write_bytes(b"\x0a\x03abc")
    try:
        [tok] = fresh_codellama_tokenizers(monkeypatch, tmp_path, "base")
    except UserError as e:
        pytest.skip(str(e))
    assert tok.vocab_size == 32016
    assert (tmp_path / "tokenizer-codellama-base.model").stat().st_size > 100_000


def test_add_infill_tokens_to_bpe_and_sentencepiece(smollm2):
    from codellama.prompts import infill_tokens
    from codellama.tokenizer import add_infill_tokens

    python_vocab = codellama_tokenizer("python")
    for tok in (smollm2, python_vocab):
        assert not tok.can_infill
        grown = add_infill_tokens(tok)
        n = tok.vocab_size
        assert grown.vocab_size == n + 4
        assert [grown.prefix_id, grown.suffix_id, grown.middle_id, grown.eot_id] == [n, n + 1, n + 2, n + 3]
        text = "def f(x):\n    return x  # ünï\n"
        assert grown.encode(text) == tok.encode(text)  # ordinary text is untouched
        ids = infill_tokens(grown, "def f(x):", "\n    return y")
        assert n in ids[:2] and ids[-1] == n + 2 and n + 1 in ids  # <PRE> first (after BOS), <MID> last
        assert grown.decode(ids) == tok.decode([i for i in ids if i < n])  # decode drops the pieces
        assert add_infill_tokens(grown) is grown
