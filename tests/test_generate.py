"""Token-level generation: greedy against a full-recompute loop and transformers, batching, stops, sampling."""

from __future__ import annotations

import threading

import pytest
import torch

from codellama.config import ModelConfig
from codellama.engine.kernels import cpu_kernels
from codellama.engine.quant import fuse_projections
from codellama.errors import UserError
from codellama.generate import Generator, longest_stop_prefix
from codellama.sampling import SamplingParams, filtered_probs
from helpers import hf_twin, letters, naive_greedy, naive_penalized_greedy, random_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=128, rope_theta=1e6,
                  max_seq_len=128, eos_id=None)


@pytest.fixture(scope="module", params=["eager", "fused"])
def gen(request):
    """The eager model, or the same weights with fused projections (the fused CPU decode step)."""
    model = random_model(CFG, seed=1)
    if request.param == "eager":
        return Generator(model)
    if cpu_kernels() is None:
        pytest.skip("the CPU kernels cannot be built here")
    return Generator(fuse_projections(model))


def test_greedy_equals_full_recompute(gen):
    prompt = [5, 17, 3, 88, 41]
    out = gen.generate([prompt], SamplingParams(max_new_tokens=20, stop_ids=()))[0]
    assert out.tokens == naive_greedy(gen.model, prompt, 20)
    assert out.finish_reason == "length" and out.prompt_tokens == 5
    fused = gen.model.layers[0].attention.wqkv is not None
    assert (gen._decoder._fused is not None) == fused  # the "fused" variant runs the fused step, not the eager


def test_greedy_equals_transformers_generate(gen):
    hf = hf_twin(random_model(CFG, seed=1))  # gen's weights (q/k/v may be stacked in gen.model)
    prompt = [1, 9, 27, 64, 12, 7]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = gen.generate([prompt], SamplingParams(max_new_tokens=16, stop_ids=()))[0]
    assert ours.tokens == ref[0, len(prompt):].tolist()


def test_batch_equals_alone(gen):
    prompts = [[3, 4, 5], [9] * 11, [1, 2, 3, 4, 5, 6, 7], [50]]
    params = SamplingParams(max_new_tokens=12, stop_ids=())
    alone = [gen.generate([p], params)[0].tokens for p in prompts]
    together = [c.tokens for c in gen.generate(prompts, params)]
    assert together == alone


def test_calls_from_several_threads_take_turns(gen):
    """Every call decodes in the same cache slots: two threads overwrote each other's keys and values."""
    prompts = [[3, 4, 5], [9] * 11, [1, 2, 3, 4, 5, 6, 7], [50, 60]]
    params = SamplingParams(max_new_tokens=40, stop_ids=())
    alone = [gen.generate([p], params)[0].tokens for p in prompts]
    got: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: got.update({i: gen.generate([prompts[i]], params)[0].tokens}))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == alone


def test_a_second_stream_in_the_same_thread_is_refused_not_a_deadlock(gen):
    params = SamplingParams(max_new_tokens=8, stop_ids=())
    first = gen.stream_generate([[3, 4, 5]], params)
    next(first)
    with pytest.raises(RuntimeError, match="already generating in this thread"):
        next(gen.stream_generate([[9, 9]], params))
    first.close()  # then the Generator is free again
    assert len(gen.generate([[9, 9]], params)[0].tokens) == 8


def test_seeded_sampling_reproducible_alone_and_in_batch(gen):
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=123, stop_ids=())
    a = gen.generate([[7, 8, 9]], sp)[0].tokens
    b = gen.generate([[7, 8, 9]], sp)[0].tokens
    greedy = SamplingParams(max_new_tokens=3, stop_ids=())
    c = gen.generate([[1, 2], [7, 8, 9]], [greedy, sp])[1].tokens  # the other row finishes early
    assert a == b == c


def test_one_seed_for_many_rows_draws_a_stream_per_row(gen):
    """n samples of one prompt (pass@k) must differ: row i draws from seed + i, as the server's choices do."""
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=123, stop_ids=())
    rows = [c.tokens for c in gen.generate([[7, 8, 9]] * 3, sp)]
    assert len({tuple(r) for r in rows}) == 3
    assert rows == [c.tokens for c in gen.generate([[7, 8, 9]] * 3, sp)]  # reproducible
    assert rows[1] == gen.generate([[7, 8, 9]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=124,
                                                              stop_ids=()))[0].tokens


def test_stop_id_ends_row_and_is_not_returned(gen):
    prompt = [5, 17, 3]
    free = gen.generate([prompt], SamplingParams(max_new_tokens=10, stop_ids=()))[0].tokens
    stop_at = free[4]
    out = gen.generate([prompt], SamplingParams(max_new_tokens=10, stop_ids=(stop_at,)))[0]
    assert out.tokens == free[: free.index(stop_at)] and out.finish_reason == "stop"


def test_stop_strings_cut_text_and_streaming_holds_back_partial_matches(gen):
    prompt = [5, 17, 3]
    free = gen.generate([prompt], SamplingParams(max_new_tokens=12, stop_ids=()), decode=letters)[0]
    stop = free.text[5:7]
    params = SamplingParams(max_new_tokens=12, stop=(stop,), stop_ids=())
    events = list(gen.stream_generate([prompt], params, decode=letters))
    final = events[-1].completion
    assert final.text == free.text[: free.text.find(stop)] and final.finish_reason == "stop"
    assert "".join(e.text for e in events) == final.text  # the stream never released past the stop


def test_longest_stop_prefix():
    assert longest_stop_prefix("abc\nde", ["\ndef"]) == 3
    assert longest_stop_prefix("abc", ["xyz"]) == 0
    assert longest_stop_prefix("ab\n", ["\nclass", "\n#"]) == 1


def test_a_stop_string_ending_in_a_character_of_several_tokens_is_never_streamed():
    from codellama.engine.rows import RowState
    from codellama.tokenizer import codellama_tokenizer

    tok = codellama_tokenizer("base")
    stop = "的龘"  # 龘 is three byte tokens: the text ends in an incomplete character twice on the way
    row = RowState(1, SamplingParams(max_new_tokens=20, stop=(stop,)), set(), 20, tok.decode)
    ids = tok.encode("到" + stop + "国")[1:]
    streamed = "".join(row.push(t) for t in ids)
    assert row.text == "到" and row.finish_reason == "stop" and streamed == row.text


@pytest.mark.parametrize("which", ["codellama", "smollm2", "codellama-infill"])
def test_text_decoded_token_by_token_is_the_whole_decode(request, which):
    """RowState decodes only the last few tokens after each one (decoding the whole text again cost O(its
    length) a token). After every token its text is what decoding them all gives: SentencePiece (a leading
    space to strip, byte pieces of characters) and byte-level BPE, tricky text and random ids (broken
    UTF-8); and with stop strings it streams, stops and cuts as a row decoding it all each time does."""
    import random

    from codellama.engine.rows import RowState
    from tokenizer_fixtures import TRICKY

    tok = request.getfixturevalue(which.removesuffix("-infill"))
    decode = tok.decode_infilling if which.endswith("infill") else tok.decode
    rng = random.Random(7)
    texts = [" ".join(TRICKY), "".join(TRICKY[::-1]), "中文 日本語 한국어 😀👍🏽 🦙"]
    seqs = [tok.encode(t)[1:] for t in texts] + [[rng.randrange(tok.vocab_size) for _ in range(300)] for _ in range(3)]
    for ids in seqs:
        row = RowState(1, SamplingParams(max_new_tokens=len(ids)), set(), len(ids), decode)
        for i, t in enumerate(ids):
            row.push(t)
            assert row.text == decode(ids[: i + 1]), (which, i)
        assert row._incremental  # never fell back to decoding it all
        whole = decode(ids)
        for _ in range(5):  # stop strings cut from the text: against a row decoding it all after each token
            a = rng.randrange(len(whole))
            stop = (whole[a : a + rng.randrange(1, 4)], "never there")
            rows = [RowState(1, SamplingParams(max_new_tokens=len(ids), stop=stop), set(), len(ids), decode)
                    for _ in range(2)]
            rows[1]._incremental = False
            streamed = [[r.push(t) for t in ids if r.finish_reason is None] for r in rows]
            assert streamed[0] == streamed[1]
            assert (rows[0].text, rows[0].finish_reason, rows[0].tokens) == (rows[1].text, rows[1].finish_reason,
                                                                             rows[1].tokens)


def test_text_decoded_token_by_token_keeps_the_space_after_a_dropped_piece(codellama):
    """decode drops <s> and the infill pieces; a decode window that started at one made
    the next piece the window's first, and SentencePiece stripped its space: "Labour ▁<MID> ▁реда" streamed as
    "Labourреда" where decoding it all gives "Labour реда" (a base model completing text can write ▁<MID>)."""
    from codellama.engine.rows import RowState

    tok = codellama
    words = tok.encode("Labour реда x")[1:]
    dropped = [tok.bos_id, tok.middle_id, tok.prefix_id, tok.eot_id]
    for ids in ([words[0], tok.middle_id, *words[1:]], [words[0], tok.bos_id, tok.middle_id, *words[1:]],
                [tok.middle_id, *words], [words[0], tok.encode(" ")[-1], tok.bos_id, *words[1:]],
                [w for word in words for w in (word, *dropped)]):
        row = RowState(1, SamplingParams(max_new_tokens=len(ids)), set(), len(ids), tok.decode)
        streamed = "".join(row.push(t) for t in ids)
        assert row.text == streamed == tok.decode(ids), [tok.id_to_piece(t) for t in ids]


def test_context_limits(gen):
    with pytest.raises(UserError, match="more than the context of 128 allows .*: shorten it, or .*--max-seq-len"):
        gen.generate([[1] * 200], SamplingParams(max_new_tokens=4))
    out = gen.generate([[1] * 120], SamplingParams(max_new_tokens=50, stop_ids=()))[0]
    assert len(out.tokens) == 8 and out.finish_reason == "length"  # clamped to the 128-token context


@pytest.mark.parametrize("prompt", [[1.5, 2], "abc", 7])
def test_prompts_that_are_not_token_ids_are_refused(gen, prompt):
    """[1.5, 2] was prefilled, failed inside the engine and came back as an empty "error" completion."""
    with pytest.raises(UserError, match="prompt 0 must be a sequence of token ids"):
        gen.generate([prompt], SamplingParams(max_new_tokens=2))


def test_prompts_as_tensors_decode_as_lists(gen):
    params = SamplingParams(max_new_tokens=4, stop_ids=())
    want = gen.generate([[5, 17, 3]], params)[0].tokens
    assert gen.generate(torch.tensor([[5, 17, 3]]), params)[0].tokens == want


@pytest.mark.parametrize("chunk", [0, -1])
def test_a_prefill_chunk_that_is_not_positive_is_refused(gen, chunk):
    """It failed every prefill inside the engine: each prompt came back as an empty "error" completion."""
    with pytest.raises(ValueError, match="prefill_chunk must be a positive"):
        Generator(gen.model, prefill_chunk=chunk).generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop=("",)), "stop"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(stop_ids=5.0), "stop_ids"),
        (dict(stop_ids=["2"]), "stop_ids"),
        (dict(seed=1.5), "seed"),  # was torch's RuntimeError from manual_seed
        (dict(seed="1"), "seed"),  # was a TypeError from seed + row
    ],
)
def test_invalid_sampling_values_rejected(kwargs, match):
    with pytest.raises(UserError, match=match):
        SamplingParams(**kwargs)


def test_stop_none_and_a_single_stop_id_are_accepted():
    """stop=None is OpenAI's "no stop strings"; one stop id alone reads like one stop string alone."""
    sp = SamplingParams(stop=None, stop_ids=7)
    assert sp.stop == () and sp.stop_ids == (7,)


def test_filtered_probs_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    one = torch.ones(1)
    p = filtered_probs(logits, one, torch.tensor([0.6]), torch.tensor([0]))
    # Meta's rule keeps a token while the mass ranked above it is <= p: 0.5 kept, 0.2 kept (0.5 above), 0.15 dropped
    torch.testing.assert_close(p, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]]))
    p = filtered_probs(logits, one, torch.tensor([1.0]), torch.tensor([2]))
    torch.testing.assert_close(p, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]]))
    p = filtered_probs(logits, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0]))
    torch.testing.assert_close(p, torch.softmax(logits / 2, -1))


def test_sampling_frequencies_follow_the_distribution():
    from codellama.sampling import RowSampler

    probs = torch.tensor([0.6, 0.3, 0.1])
    sampler = RowSampler.build([SamplingParams(temperature=1.0, seed=0)], torch.device("cpu"))
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sampler.sample(probs.log()[None])[0]] += 1
    freq = counts / counts.sum()
    assert (freq - probs).abs().max() < 0.04  # ~4.5 sigma for n=3000


def test_a_large_frequency_penalty_stops_the_repeats_of_plain_greedy(gen):
    prompt, n = [9] * 11, 24
    plain = gen.generate([prompt], SamplingParams(max_new_tokens=n, stop_ids=()))[0].tokens
    assert len(set(plain)) < n  # this tiny model loops
    penalised = gen.generate([prompt], SamplingParams(max_new_tokens=n, stop_ids=(), frequency_penalty=2.0))[0].tokens
    assert len(set(penalised)) == n
    assert penalised == naive_penalized_greedy(gen.model, prompt, n, frequency_penalty=2.0)


def test_logit_bias_bans_and_forces_tokens_in_greedy_decoding(gen):
    prompt = [5, 17, 3, 88, 41]
    plain = gen.generate([prompt], SamplingParams(max_new_tokens=6, stop_ids=()))[0].tokens
    banned = gen.generate([prompt], SamplingParams(max_new_tokens=6, stop_ids=(), logit_bias={plain[0]: -100}))
    assert banned[0].tokens[0] != plain[0] and plain[0] not in banned[0].tokens
    forced = gen.generate([prompt], SamplingParams(max_new_tokens=6, stop_ids=(), logit_bias={61: 100}))
    assert forced[0].tokens == [61] * 6


def test_a_logit_bias_past_the_vocabulary_is_refused(gen):
    with pytest.raises(UserError, match="logit_bias has token id 97, outside the model's vocabulary of 97"):
        gen.generate([[1, 2]], SamplingParams(max_new_tokens=2, logit_bias={97: 1.0}))
