"""Training data streams: answers-only loss masks, mixtures, rank slicing, resumable state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codellama.errors import UserError
from codellama.prompts import chat_tokens
from codellama.train.data import ChatExamples, InMemoryTokens, Mixture, RankBatches, ShardsSource, answer_mask

BOS, EOS = 1, 2


def enc(text: str) -> list[int]:
    return [ord(c) + 3 for c in text]


def dec(ids) -> str:
    return "".join(chr(i - 3) if i > 2 else {1: "<s>", 2: "</s>"}[i] for i in ids)


def inst_chat(messages: list[dict]) -> list[int]:
    """Llama 2's [INST] format on a character vocabulary (the shape of prompts.chat_tokens' output)."""
    ids = []
    for m in messages:
        if m["role"] == "user":
            ids += [BOS] + enc(f"[INST] {m['content']} [/INST]")
        else:
            ids += enc(f" {m['content']} ") + [EOS]
    return ids


CONV = [
    {"role": "user", "content": "add 1 and 2"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "now times 4"},
    {"role": "assistant", "content": "12, since 3*4"},
]


def _spans(ids, ans):
    spans, cur = [], []
    for i, a in zip(ids, ans):
        if a:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + [cur] if cur else spans


def test_answer_mask_covers_exactly_the_answers():
    ids, ans = answer_mask(CONV, inst_chat, {EOS})
    assert ids == inst_chat(CONV)
    assert [dec(s) for s in _spans(ids, ans)] == [" 3 </s>", " 12, since 3*4 </s>"]


def test_answer_mask_with_the_real_chat_format(codellama):
    tok = codellama
    ids, ans = answer_mask(CONV, lambda m: chat_tokens(tok, m), tok.stop_ids)
    # Meta's chat_completion layout of the whole dialog: <s>[INST] u [/INST] a </s> per turn
    expected = []
    for u, a in (("add 1 and 2", "3"), ("now times 4", "12, since 3*4")):
        prompt = tok.encode(f"[INST] {u} [/INST]", bos=True)
        pair = tok.encode(f"[INST] {u} [/INST] {a} ", bos=True, eos=True)
        assert pair[: len(prompt)] == prompt
        expected += [(i, k >= len(prompt)) for k, i in enumerate(pair)]
    assert list(zip(ids, ans)) == expected
    assert ids[-1] == tok.eos_id and ans[-1]  # the end of each answer is learnt


def test_answer_mask_with_a_chat_template(smollm2):
    """SmolLM2's ChatML template: each answer's text and its <|im_end|> are trained, nothing else."""
    tok = smollm2
    ids, ans = answer_mask(CONV, lambda m: chat_tokens(tok, m), tok.stop_ids)
    im_end = tok.piece_to_id("<|im_end|>")
    spans = _spans(ids, ans)
    assert [tok.decode(s[:-1]) for s in spans] == ["3", "12, since 3*4"]
    assert all(s[-1] == im_end for s in spans)
    assert ids[: len(chat_tokens(tok, CONV[:1]))] == chat_tokens(tok, CONV[:1])


def test_chat_examples_shift_pad_and_truncate():
    convs = [answer_mask(CONV, inst_chat, {EOS}), answer_mask(CONV[:2], inst_chat, {EOS})]
    T = 40
    ds = ChatExamples(convs, seq_len=T, pad_id=0, seed=0)
    seen = set()
    for _ in range(2):
        ex = ds.next()
        assert ex.tokens.shape == (T + 1,) and ex.mask.shape == (T,)
        ids, ans = next(c for c in convs if c[0][:T + 1] == ex.tokens[: len(c[0][:T + 1])].tolist())
        seen.add(len(ids))
        for j in range(T):  # mask[j] <=> target tokens[j+1] is an answer token
            assert bool(ex.mask[j]) == (j + 1 < len(ids) and ans[j + 1])
        if len(ids) < T + 1:
            assert (ex.tokens[len(ids):] == 0).all() and not ex.mask[len(ids) - 1:].any()
    assert len(seen) == 2


def test_chat_without_answers_in_context_is_an_error(tmp_path):
    convs = [answer_mask([{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}], inst_chat,
                         {EOS})]
    with pytest.raises(UserError, match="no conversation with an assistant answer"):
        ChatExamples(convs, seq_len=16, pad_id=0)


def test_chat_jsonl_errors(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:1: expected"):
        ChatExamples.from_jsonl(bad, tokenizer=None, seq_len=16)


def test_chat_jsonl_with_messages_encoded_twice(tmp_path, codellama):
    """Each message a JSON string (holding "role" and "content"): was an AttributeError traceback."""
    bad = tmp_path / "c.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad.write_text(json.dumps({"messages": [json.dumps(m) for m in turns]}) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:1: expected"):
        ChatExamples.from_jsonl(bad, codellama, seq_len=64)


def test_chat_jsonl_with_byte_order_mark_or_not_utf8(tmp_path, codellama):
    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n")  # as Windows editors save UTF-8
    plain = tmp_path / "plain.jsonl"
    plain.write_text(line + "\n")
    assert ChatExamples.from_jsonl(bom, codellama, seq_len=64).convs == \
        ChatExamples.from_jsonl(plain, codellama, seq_len=64).convs
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(line.replace("hello", "caf\u00e9").encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=r"latin1.jsonl is not UTF-8 text .*save it as UTF-8"):
        ChatExamples.from_jsonl(latin1, codellama, seq_len=64)


def small_corpus(tmp_path, tok):
    """`codellama data` on 20 small Python files: FIM rate 0.9, SPM rate 0.5, seq_len 64, in tmp_path/c."""
    from codellama.data.fim import FimConfig
    from codellama.data.pipeline import PipelineConfig, build_corpus
    from codellama.data.sources import SourceSpec

    (tmp_path / "src").mkdir()
    for i in range(20):
        (tmp_path / "src" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n")
    cfg = PipelineConfig(seq_len=64, fim=FimConfig(rate=0.9, spm_rate=0.5), decontam=False, val_fraction=0.0)
    build_corpus([SourceSpec("path", str(tmp_path / "src"))], tok, tmp_path / "c", cfg, "t")


def test_shards_built_with_other_fim_settings_are_refused(tmp_path):
    from data_tokenizer import sp_test_tokenizer

    small_corpus(tmp_path, sp_test_tokenizer())
    ShardsSource(tmp_path / "c", "train", 64, fim_rate=0.9, fim_spm_rate=0.5)
    with pytest.raises(UserError, match=r"built with SPM rate 0.5 but the recipe asks for data.fim_spm_rate = 1.0"):
        ShardsSource(tmp_path / "c", "train", 64, fim_rate=0.9, fim_spm_rate=1.0)
    with pytest.raises(UserError, match=r"built with FIM rate 0.9 but the recipe asks for data.fim_rate = 0.5"):
        ShardsSource(tmp_path / "c", "train", 64, fim_rate=0.5, fim_spm_rate=0.5)
    ShardsSource(tmp_path / "c", "train", 128, fim_rate=0.9)  # windows of a multiple: boundaries stay put
    for seq_len in (32, 96):
        with pytest.raises(UserError, match=rf"contexts of 64 tokens; training at seq_len {seq_len} \(not a multiple"):
            ShardsSource(tmp_path / "c", "train", seq_len, fim_rate=0.9)


def test_shards_of_another_tokenizer_are_refused(tmp_path, codellama):
    from data_tokenizer import sp_test_tokenizer

    small_corpus(tmp_path, sp_test_tokenizer())
    source = ShardsSource(tmp_path / "c", "train", 64, fim_rate=0.9, fim_spm_rate=0.5, name="code")
    source.check_tokenizer(sp_test_tokenizer())
    with pytest.raises(UserError, match=r"source 'code' was tokenised by another tokenizer \(t, vocabulary \d+\)"):
        source.check_tokenizer(codellama)  # more pieces than the corpus's ids reach: only the probe tells


def test_in_memory_tokens_epochs_and_state():
    toks = np.arange(1001)
    src = InMemoryTokens(toks, seq_len=10, seed=3)
    first_epoch = [int(src.next().tokens[0]) for _ in range(100)]
    assert sorted(first_epoch) == list(range(0, 1000, 10))  # every window once per epoch
    ex = src.next()
    assert ex.tokens.tolist() == list(range(int(ex.tokens[0]), int(ex.tokens[0]) + 11))  # T+1 consecutive
    state = src.state_dict()
    after = [src.next().tokens.tolist() for _ in range(5)]
    again = InMemoryTokens(toks, seq_len=10, seed=3)
    again.load_state_dict(state)
    assert [again.next().tokens.tolist() for _ in range(5)] == after
    with pytest.raises(UserError, match="empty or too short.*seq_len\\+1 = 11"):
        InMemoryTokens(np.arange(5), seq_len=10)
    with pytest.raises(UserError, match="does not exist"):
        InMemoryTokens.from_file("/nonexistent.npy", 10)


def test_mixture_proportions_and_resume():
    a = InMemoryTokens(np.zeros(10_001, dtype=np.int64), 10, seed=1)
    b = InMemoryTokens(np.ones(10_001, dtype=np.int64), 10, seed=2)
    c = InMemoryTokens(np.full(10_001, 2, dtype=np.int64), 10, seed=3)
    mix = Mixture({"a": a, "b": b, "c": c}, {"a": 0.85, "b": 0.08, "c": 0.07}, seed=0)
    n = 20_000
    counts = np.bincount([int(mix.next().tokens[0]) for _ in range(n)], minlength=3) / n
    assert np.allclose(counts, [0.85, 0.08, 0.07], atol=0.01), counts
    state = mix.state_dict()
    nxt = [mix.next().tokens.tolist() for _ in range(20)]
    mix.load_state_dict(state)
    assert [mix.next().tokens.tolist() for _ in range(20)] == nxt
    mix.load_state_dict(state)
    mix.skip(7)  # skipping equals drawing
    assert mix.next().tokens.tolist() == nxt[7]


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_concatenate_to_the_single_rank_batch(world):
    toks = np.arange(5001)
    G = 8
    one = RankBatches(InMemoryTokens(toks, 10, seed=5), G)
    ranks = [RankBatches(InMemoryTokens(toks, 10, seed=5), G, r, world) for r in range(world)]
    for _ in range(3):
        full = one.next_batch()
        parts = [rb.next_batch() for rb in ranks]
        assert torch.equal(torch.cat([p.tokens for p in parts]), full.tokens)
        assert full.mask.all()
    assert all(rb.state_dict() == one.state_dict() for rb in ranks)  # state does not depend on the rank
