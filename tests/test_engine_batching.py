"""Continuous batching: requests joining and leaving a running batch decode exactly as they would alone."""

from __future__ import annotations

import asyncio
import gc
import re
import time

import pytest
import torch

import codellama.model as model_module
from codellama.config import ModelConfig
from codellama.engine import batching, decode
from codellama.engine.batching import Engine, Scheduler
from codellama.engine.decode import Decoder
from codellama.engine.quant import quantize
from codellama.errors import UserError
from codellama.generate import Generator
from codellama.sampling import RowSampler, SamplingParams
from helpers import eager_or_fused, letters, naive_greedy, naive_penalized_greedy, random_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=128, rope_theta=1e6,
                  max_seq_len=96, eos_id=None)
PROMPTS = [[5, 17, 3, 88, 41], [9] * 11, [1, 2, 3, 4, 5, 6, 7], [50], [33, 34] * 9, [70, 1, 70]]


@pytest.fixture(scope="module", params=["eager", "fused"])
def model(request):
    """The same weights run by the eager model, or (projections fused) by the fused CPU step."""
    return eager_or_fused(CFG, request.param)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def scheduler(request):
    """Scheduler, reading each step's tokens at once or (overlap, the GPU default) after queueing the next."""
    return lambda decoder, **kw: Scheduler(decoder, overlap=request.param, **kw)


def run(sched: Scheduler, arrivals: dict[int, list[tuple]] | None = None) -> dict[int, object]:
    """Step until idle; arrivals[k] = requests (prompt, params) submitted before step k."""
    arrivals = dict(arrivals or {})
    out, k = {}, 0
    while sched.has_work or arrivals:
        for prompt, params in arrivals.pop(k, []):
            sched.submit(prompt, params)
        for req, ev in sched.step():
            if ev.completion is not None:
                out[req.id] = ev.completion
        k += 1
    return out


def test_staggered_arrivals_equal_full_recompute(model, scheduler):
    # 3 slots for 6 requests of different lengths arriving at different steps: rows join and leave
    sched = scheduler(Decoder(model, max_batch=3, max_seq_len=96), stop_ids=())
    lengths = [12, 3, 9, 7, 15, 1]
    arrivals = {0: [], 2: [], 5: []}
    for i, (p, n) in enumerate(zip(PROMPTS, lengths)):
        arrivals[[0, 0, 2, 2, 5, 5][i]].append((p, SamplingParams(max_new_tokens=n)))
    out = run(sched, arrivals)
    for i, (p, n) in enumerate(zip(PROMPTS, lengths)):
        assert out[i].tokens == naive_greedy(model, p, n), i
        assert out[i].finish_reason == "length"
    assert sorted(sched.free_slots) == [0, 1, 2] and not sched.active


def test_scheduler_equals_generator_alone(model, scheduler):
    gen = Generator(random_model(CFG, seed=1))  # a twin: the scheduler below owns `model`'s cache
    params = SamplingParams(max_new_tokens=10, stop_ids=())
    alone = [gen.generate([p], params)[0].tokens for p in PROMPTS]
    sched = scheduler(Decoder(model, max_batch=8, max_seq_len=96), stop_ids=())
    out = run(sched, {0: [(p, params) for p in PROMPTS]})
    assert [out[i].tokens for i in range(len(PROMPTS))] == alone


def test_seeded_sampling_same_alone_and_among_others(model, scheduler):
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=7)
    alone = run(scheduler(Decoder(model, 4, 96), stop_ids=()), {0: [(PROMPTS[0], sp)]})[0].tokens
    others = [(p, SamplingParams(max_new_tokens=5, temperature=1.0, seed=i)) for i, p in enumerate(PROMPTS[1:4])]
    out = run(scheduler(Decoder(model, 4, 96), stop_ids=()), {0: others, 3: [(PROMPTS[0], sp)]})
    assert out[3].tokens == alone


def test_penalised_and_plain_rows_each_decode_as_alone(model, scheduler):
    # 2 slots for 5 requests arriving at different steps: penalised rows share batches with plain ones, and
    # a penalised request takes a slot after another (its counts start from zero again)
    sched = scheduler(Decoder(model, max_batch=2, max_seq_len=96), stop_ids=())
    settings = [dict(frequency_penalty=2.0, presence_penalty=2.0), {},
                dict(presence_penalty=-1.5, logit_bias={4: 3.0, 86: -100}), dict(frequency_penalty=0.8),
                dict(logit_bias={42: -2.5, 7: 1.0}, repetition_penalty=1.6)]
    lengths = [14, 9, 12, 6, 10]
    arrivals: dict[int, list[tuple]] = {0: [], 1: [], 4: []}
    for i, (kw, n) in enumerate(zip(settings, lengths)):
        arrivals[[0, 0, 1, 4, 4][i]].append((PROMPTS[i + 1], SamplingParams(max_new_tokens=n, **kw)))
    out = run(sched, arrivals)
    for i, (kw, n) in enumerate(zip(settings, lengths)):
        assert out[i].tokens == naive_penalized_greedy(model, PROMPTS[i + 1], n, **kw), i
    assert sched._history is not None and sched._history.generated.shape == (2, CFG.vocab_size)


def test_logprobs_of_a_penalised_row_are_the_models(model, scheduler):
    sched = scheduler(Decoder(model, 2, 96), stop_ids=())
    forced = sched.submit(PROMPTS[0], SamplingParams(max_new_tokens=3, logit_bias={61: 100}), logprobs=1)
    out = run(sched)[forced.id]
    assert out.tokens == [61] * 3
    ids = list(PROMPTS[0]) + out.tokens
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], -1)  # [T, V]
    for k, lp in enumerate(out.logprobs):
        assert abs(lp.logprob - float(ref[len(PROMPTS[0]) - 1 + k, 61])) < 1e-4


def test_plain_batches_make_no_token_counts(model, scheduler):
    sched = scheduler(Decoder(model, 2, 96), stop_ids=())
    run(sched, {0: [(p, SamplingParams(max_new_tokens=3, temperature=0.5, seed=1)) for p in PROMPTS[:2]]})
    assert sched._history is None and sched._sampler[1].penalties is None


@pytest.mark.parametrize("stop", [(), ("c",)])
def test_a_request_read_once_finished_reports_its_first_token_and_its_completion(model, scheduler, stop):
    """pieces=False (a response sent in one piece): the Completion of a request streamed in pieces, its first
    token still reported (the server times it), and without stop strings its text decoded once, at the end,
    and in no event before the Completion."""
    calls: dict[bool, list[int]] = {True: [], False: []}  # the lengths each request's decode was called with

    def decoder(pieces: bool):
        def decode(ids: list[int]) -> str:
            calls[pieces].append(len(ids))
            return letters(ids)
        return decode

    sched = scheduler(Decoder(model, 2, 96), stop_ids=())
    params = SamplingParams(max_new_tokens=8, stop=stop)
    events: dict[bool, list] = {True: [], False: []}
    for pieces in (True, False):
        sched.submit(PROMPTS[0], params, decoder(pieces), on_event=events[pieces].append, pieces=pieces)
    while sched.has_work:
        for req, ev in sched.step():
            req.on_event(ev)
    streamed, once = events[True], events[False]
    a, b = once[-1].completion, streamed[-1].completion  # (the second may copy the first's prompt: cached_tokens)
    assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)
    assert "".join(ev.text for ev in streamed) == streamed[-1].completion.text
    tokens = len(once[-1].completion.tokens)
    assert len(calls[True]) >= tokens  # the text after every token (the last few tokens decoded again)
    if stop:  # stop strings are looked for after every token: its text is released as a streamed request's
        assert [ev.text for ev in once] == [ev.text for ev in streamed] and calls[False] == calls[True]
    else:
        assert [ev.text for ev in once] == ["", ""] and calls[False] == [tokens]


def test_cancel_frees_slot_for_waiting_request(model, scheduler):
    sched = scheduler(Decoder(model, max_batch=2, max_seq_len=96), stop_ids=())
    long = SamplingParams(max_new_tokens=50)
    a, b = sched.submit(PROMPTS[0], long), sched.submit(PROMPTS[1], long)
    c = sched.submit(PROMPTS[2], SamplingParams(max_new_tokens=4))
    sched.step()
    assert {r.id for r in sched.active} == {a.id, b.id} and c.slot is None and not sched.free_slots
    a.cancel()
    events = sched.step()
    done = {req.id: ev.completion for req, ev in events if ev.completion is not None}
    assert done[a.id].finish_reason == "cancelled" and c.slot is not None  # c took a's slot at once
    out = run(sched)
    assert out[c.id].tokens == naive_greedy(model, PROMPTS[2], 4)
    b.cancel()
    run(sched)
    assert sorted(sched.free_slots) == [0, 1]


def test_cancelled_waiting_request_finishes_while_slots_are_busy(model, scheduler):
    # a queued client that gave up must not hold a place under the server's limit until a slot frees
    sched = scheduler(Decoder(model, max_batch=1, max_seq_len=96), stop_ids=())
    busy = sched.submit(PROMPTS[0], SamplingParams(max_new_tokens=30))
    queued = sched.submit(PROMPTS[1], SamplingParams(max_new_tokens=4))
    sched.step()
    queued.cancel()
    events = sched.step()
    done = {req.id: ev.completion for req, ev in events if ev.completion is not None}
    assert done[queued.id].finish_reason == "cancelled" and not done[queued.id].tokens
    assert busy in sched.active and busy not in done and sched.unfinished == {busy} and not sched.waiting
    assert run(sched)[busy.id].tokens == naive_greedy(model, PROMPTS[0], 30)


@pytest.fixture
def chunked(monkeypatch):
    """A fused model's Scheduler of 2 slots prefilling 8 prompt tokens a step while another request decodes."""
    monkeypatch.setattr(batching, "PREFILL_TOKENS_PER_STEP", 8)
    model = eager_or_fused(CFG, "fused")
    sched = Scheduler(Decoder(model, max_batch=2, max_seq_len=96), stop_ids=())
    assert sched.chunk_prefills
    return model, sched


LONG = [(7 * i) % 97 for i in range(40)]


def test_a_prompt_arriving_while_another_decodes_is_prefilled_a_chunk_a_step(chunked):
    model, sched = chunked
    short = sched.submit(PROMPTS[0], SamplingParams(max_new_tokens=20))
    sched.step()  # alone: its prompt whole, then its first step
    long = sched.submit(LONG, SamplingParams(max_new_tokens=6))
    steps = []  # per step: (the short request's tokens so far, whether the long one got its first)
    while sched.has_work:
        events = sched.step()
        steps.append((len(short.row.tokens), any(r is long for r, _ in events)))
        if not any(got_first for _, got_first in steps):  # its chunks so far, in its slot
            assert sched.decoder.held[long.slot] == LONG[: 8 * len(steps)]
    # 4 chunks of 8, then the last 8 tokens and its first token; the short request decoded on meanwhile
    assert [got_first for _, got_first in steps[:5]] == [False] * 4 + [True]
    assert [n for n, _ in steps[:5]] == [3, 4, 5, 6, 7]  # 2 after the first step: its prefill's and one
    out = {r.id: r.row.completion() for r in (short, long)}
    assert out[short.id].tokens == naive_greedy(model, PROMPTS[0], 20)
    assert out[long.id].tokens == naive_greedy(model, LONG, 6)
    assert out[long.id].cached_tokens == 0  # its own chunks are not a cache hit


def test_a_request_cancelled_between_its_prefill_chunks_frees_its_slot(chunked):
    model, sched = chunked
    short = sched.submit(PROMPTS[1], SamplingParams(max_new_tokens=30))
    sched.step()
    long = sched.submit(LONG, SamplingParams(max_new_tokens=4))
    sched.step(), sched.step()  # two chunks
    slot = long.slot
    long.cancel()
    events = sched.step()
    assert [ev.completion.finish_reason for r, ev in events if r is long] == ["cancelled"]
    assert slot in sched.free_slots and not sched.prefilling and sched.active == [short]
    assert sched.decoder.held[slot] == LONG[:16]  # what its chunks computed, for a later prompt to reuse
    again = sched.submit(LONG, SamplingParams(max_new_tokens=4))
    while not again.finished:
        sched.step()
    assert again.row.completion().tokens == naive_greedy(model, LONG, 4)
    assert again.row.completion().cached_tokens == 16


def test_prompts_admitted_with_nobody_decoding_are_prefilled_whole(chunked):
    model, sched = chunked
    reqs = [sched.submit(p, SamplingParams(max_new_tokens=3)) for p in (LONG, PROMPTS[4])]
    sched.step()
    assert not sched.prefilling and all(len(r.row.tokens) == 2 for r in reqs)  # its prefill's and a step's


def test_stop_ids_and_lengths_per_request(model, scheduler):
    free = naive_greedy(model, PROMPTS[0], 10)
    sched = scheduler(Decoder(model, 4, 96), stop_ids=())
    out = run(sched, {0: [(PROMPTS[0], SamplingParams(max_new_tokens=10, stop_ids=(free[3],))),
                          (PROMPTS[0], SamplingParams(max_new_tokens=2))]})
    assert out[0].tokens == free[: free.index(free[3])] and out[0].finish_reason == "stop"
    assert out[1].tokens == free[:2] and out[1].finish_reason == "length"


def test_overlap_queues_the_next_step_before_reading_this_one(model):
    free = naive_greedy(model, PROMPTS[2], 10)  # its 4th token appears there first
    calls = {}
    for overlap in (False, True):
        decoder = Decoder(model, 2, 96)
        decode, n = decoder.decode, [0]

        def counted(*args, decode=decode, n=n):
            n[0] += 1
            return decode(*args)
        decoder.decode = counted
        sched = Scheduler(decoder, stop_ids=(), overlap=overlap)
        req = sched.submit(PROMPTS[2], SamplingParams(max_new_tokens=10, stop_ids=(free[3],)))
        sched.step()  # prefill (token 0), then the first decode step: read at once, or left queued
        assert (len(req.row.tokens), sched._pending is not None) == ((1, True) if overlap else (2, False))
        out = run(sched)[req.id]
        assert out.tokens == free[:3] and out.finish_reason == "stop"
        calls[overlap] = n[0]
    # decode produced tokens 1, 2 and the stop token; overlap also ran one step past the stop, discarded
    assert calls == {False: 3, True: 4}


def test_context_clamps_and_rejects(model, scheduler):
    sched = scheduler(Decoder(model, 2, 32), stop_ids=())
    with pytest.raises(UserError, match="more than the context"):
        sched.submit([1] * 32, SamplingParams(max_new_tokens=1))
    out = run(sched, {0: [([1] * 28, SamplingParams(max_new_tokens=100))]})
    assert len(out[0].tokens) == 4


def test_chunked_prefill_matches_single_pass(model):
    prompt = list(range(3, 80))
    whole = Decoder(model, 1, 96, prefill_chunk=2048).prefill([prompt], [0])[0]
    chunked = Decoder(model, 1, 96, prefill_chunk=16).prefill([prompt], [0])[0]
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    gen = Generator(model, prefill_chunk=7)
    assert gen.generate([prompt], SamplingParams(max_new_tokens=8, stop_ids=()))[0].tokens == naive_greedy(model, prompt, 8)


def test_logprobs_are_the_model_distribution(model, scheduler):
    sched = scheduler(Decoder(model, 2, 96), stop_ids=())
    req = sched.submit(PROMPTS[0], SamplingParams(max_new_tokens=3), logprobs=2)
    out = run(sched)[req.id]
    ids = list(PROMPTS[0]) + out.tokens
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0], -1)  # [T, V]
    for k, lp in enumerate(out.logprobs):
        row = ref[len(PROMPTS[0]) - 1 + k]
        assert lp.token == out.tokens[k] and abs(lp.logprob - float(row[lp.token])) < 1e-4
        assert list(lp.top) == row.topk(2).indices.tolist()


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_engine_thread_blocking_and_async(model, overlap):
    params = SamplingParams(max_new_tokens=6)
    with Engine(model, max_batch=4, context_len=96, overlap=overlap) as engine:
        outs = engine.generate(PROMPTS, params)
        assert [o.tokens for o in outs] == [naive_greedy(model, p, 6) for p in PROMPTS]

        async def first_two_then_leave():
            got = []
            async for ev in engine.stream(PROMPTS[1], SamplingParams(max_new_tokens=80), decode=letters):
                got.append(ev)
                if len(got) == 2:
                    break
            return got

        async def whole():
            return [ev async for ev in engine.stream(PROMPTS[2], params)]

        async def both():
            return await asyncio.gather(first_two_then_leave(), whole())

        left, full = asyncio.run(both())
        assert len(left) == 2 and full[-1].completion.tokens == naive_greedy(model, PROMPTS[2], 6)
        # the abandoned request was cancelled and its slot freed; the engine keeps serving
        assert engine.generate([PROMPTS[3]], params)[0].tokens == naive_greedy(model, PROMPTS[3], 6)
        assert engine.stats()["active"] == 0 and len(engine.scheduler.free_slots) == 4


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_engine_survives_a_request_that_breaks_the_model(model, overlap):
    with Engine(model, max_batch=2, context_len=96, overlap=overlap) as engine:
        bad = engine.generate([[5, 1000]], SamplingParams(max_new_tokens=3))[0]  # id out of the vocabulary
        assert bad.finish_reason == "error"
        ok = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0]
        assert ok.tokens == naive_greedy(model, PROMPTS[0], 3)


def test_compiled_step_covers_buckets_of_rows_and_positions(monkeypatch):
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    decoder = Decoder(random_model(CFG, seed=1), max_batch=8, max_seq_len=36, compile=True)
    assert decoder.model.cache_shape == (8, 40)  # a multiple of MIN_KV_BUCKET positions
    calls = []

    def step(tokens, pos, kv_units):  # the step uncompiled, recording the sizes the compiled one gets
        calls.append((tokens.shape[0], kv_units * decode.KV_UNIT, pos[:, 0].tolist()))
        return decoder._unit_step(tokens, pos, kv_units)

    def chunk(tokens, pos, slots, kv_units, last_only):  # likewise for the prefill
        calls.append((tokens.shape[1], kv_units * decode.PREFILL_KV_UNIT, slots.tolist()))
        return decoder._unit_chunk(tokens, pos, slots, kv_units, last_only)

    decoder._step, decoder._prefill = step, chunk
    decoder.prefill([PROMPTS[0], PROMPTS[1], PROMPTS[3]], [0, 4, 2])  # 5, 11 and 1 tokens (eager: no call)
    assert calls == [(5, 16, [0]), (11, 16, [4])]  # 8 positions would be one unit of 8: at least 2 units
    calls.clear()
    decoder.decode([0, 4], [7, 8], [5, 11])  # rows 0..4 -> 8; positions up to 11 -> 16
    decoder.decode([0], [7], [6])  # one row; the fewest positions
    decoder.decode([4], [8], [33])  # the bucket (64) capped at the cache's 40 positions
    d = 39  # free rows write at the cache's last position
    assert calls == [(8, 16, [5, d, d, d, 11, d, d, d]), (1, 8, [6]), (8, 40, [d, d, d, d, 33, d, d, d])]


@pytest.mark.slow
def test_compiled_decode_step_same_greedy_tokens(scheduler, monkeypatch):
    # the CUDA-graph path compiled on the CPU (no graphs there, same trace, the same dynamic sizes): the
    # step's buckets change as rows leave at different steps (4 rows, then 1) and positions grow (8, 16, 32)
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1), max_batch=4, max_seq_len=96, compile=True)
    lengths = [8, 3, 6]
    out = run(scheduler(decoder, stop_ids=()),
              {0: [(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]})
    assert [out[i].tokens for i in range(3)] == [naive_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    assert decoder.compiled  # (not fallen back to eager)


def test_blocks_compiled_once_for_every_layer_decode_the_greedy_tokens(monkeypatch):
    # compile_scope "blocks" (a candidate for the GPU: a fifth of the compile time): one compiled block that
    # every layer runs, by inductor, through buckets of rows and positions and prefills of several lengths
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or compile_(fn, **kw))
    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1), max_batch=4, max_seq_len=96, compile=True, compile_scope="blocks")
    torch._dynamo.utils.counters.clear()
    lengths = [8, 3, 6]
    out = run(Scheduler(decoder, stop_ids=(), overlap=True),
              {0: [(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]})
    assert [out[i].tokens for i in range(3)] == [naive_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    assert decoder.compiled and compiled == [model_module.TransformerBlock.forward]
    # a graph for steps, one for prefill chunks (a first one static, before dynamo saw a second size): not
    # one per layer
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    with pytest.raises(ValueError, match="needs attention='sdpa'"):
        Decoder(random_model(CFG, seed=1), max_batch=1, max_seq_len=96, compile_scope="blocks", attention="flex")
    with pytest.raises(ValueError, match="'step' or 'blocks'"):
        Decoder(random_model(CFG, seed=1), max_batch=1, max_seq_len=96, compile_scope="layers")


@pytest.mark.slow
def test_flex_decode_step_traces_whole_and_decodes_the_greedy_tokens(monkeypatch):
    # The GPU candidate's trace as the previous test's (buckets of rows and positions, the block mask made
    # inside the graph), through dynamo and AOT autograd onto eager kernels: inductor's CPU lowering of
    # FlexAttention is no path of ours (the GPU's is Triton: tests/test_engine_gpu.py).
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []  # what dynamo traced: FlexAttention in its own graphs, not another decoder's reused

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return aot_eager(gm, example_inputs)

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph, dynamic, options: compile_(
        fn, fullgraph=fullgraph, dynamic=dynamic, backend=backend))
    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1), max_batch=4, max_seq_len=96, compile=True, attention="flex")
    # one prefill length: one prefill graph; slot 0 decodes on alone, in flex's one-row step
    prompts, lengths = [PROMPTS[0], PROMPTS[0][::-1]], [8, 3]
    out = run(Scheduler(decoder, stop_ids=(), overlap=True),
              {0: [(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]})
    assert [out[i].tokens for i in range(2)] == [naive_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    assert decoder.compiled and any("flex_attention" in g for g in graphs)


def test_flex_attention_decodes_the_sdpa_steps_logits(monkeypatch):
    # FlexAttention (a candidate for the GPU's compiled step) over the same cache, eager: steps of one row,
    # slot 0 (flex's only use: a step runs the first n slots), at the positions of three prompts, each masked
    # to its prefix by the block mask (the cache past it holds the longer prompts' keys)
    import codellama.model

    calls = []
    flex = codellama.model.flex_attention
    monkeypatch.setattr(codellama.model, "flex_attention", lambda *a, **k: calls.append(1) or flex(*a, **k))
    logits = {}
    for attention in ("sdpa", "flex"):
        decoder = Decoder(random_model(CFG, seed=1), max_batch=4, max_seq_len=96, compile=False, attention=attention)
        logits[attention] = []
        for token, p in zip([7, 8, 9], sorted(PROMPTS[:3], key=len, reverse=True)):
            decoder.prefill([p], [0])
            logits[attention].append(decoder.decode([0], [token], [len(p)]))
    assert len(calls) == 3 * CFG.n_layers  # each step's every layer ran flex
    for flex_logits, sdpa_logits in zip(logits["flex"], logits["sdpa"]):
        torch.testing.assert_close(flex_logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'sdpa' or 'flex'"):
        Decoder(random_model(CFG, seed=1), max_batch=1, max_seq_len=96, attention="flash")
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        Decoder(random_model(CFG, seed=1), max_batch=1, max_seq_len=96, compile=True, graphs="manual")


def test_scored_prompt_has_the_full_passes_logprobs_and_decodes_on(model, scheduler):
    # echo + logprobs: a prompt prefilled in chunks of 4 (the scores cross chunk boundaries) beside a plain
    # request; its logprobs equal one causal pass over the whole prompt, and decoding continues from its cache
    prompt = PROMPTS[4]  # 18 tokens
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([prompt]))[0], dim=-1)  # [T, V]
    sched = scheduler(Decoder(model, max_batch=2, max_seq_len=96, prefill_chunk=4), stop_ids=())
    scored = sched.submit(prompt, SamplingParams(max_new_tokens=4), logprobs=2, prompt_logprobs=True)
    plain = sched.submit(PROMPTS[0], SamplingParams(max_new_tokens=4))
    out = run(sched)
    lps = out[scored.id].prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None and out[plain.id].prompt_logprobs is None
    assert [lp.token for lp in lps[1:]] == prompt[1:]
    assert [lp.logprob for lp in lps[1:]] == pytest.approx(full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])
                                                           [:, 0].tolist(), abs=1e-4)
    assert [list(lp.top) for lp in lps[1:]] == full[:-1].topk(2).indices.tolist()
    assert out[scored.id].tokens == naive_greedy(model, prompt, 4)
    assert out[plain.id].tokens == naive_greedy(model, PROMPTS[0], 4)


def test_sampling_runs_on_one_thread_and_restores_torch_threads(model, monkeypatch):
    sample, during = RowSampler.sample, []

    def spy(self, logits):
        during.append(torch.get_num_threads())
        return sample(self, logits)

    monkeypatch.setattr(RowSampler, "sample", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sched = Scheduler(Decoder(model, 2, 96), stop_ids=())
        out = run(sched, {0: [(PROMPTS[0], SamplingParams(max_new_tokens=4, temperature=0.8, seed=1))]})
        assert len(out[0].tokens) == 4 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert during == [1] * 4  # the prefill's token and three decode steps


def test_warm_up_runs_one_row_then_several_and_leaves_the_engine_fresh(model):
    engine = Engine(model, max_batch=4, context_len=96)
    rows_per_step = []
    decode_step = engine.decoder.decode

    def spy(slots, tokens, positions):
        rows_per_step.append(len(slots))
        return decode_step(slots, tokens, positions)

    engine.decoder.decode = spy
    engine.warm_up()
    assert set(rows_per_step) == {1, 2}  # both compiled variants of a GPU step (one row, several)
    assert engine.stats() == {"active": 0, "waiting": 0, "unfinished": 0, "slots": 4, "finished": {}}
    with engine:
        out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5))[0]
        assert out.tokens == naive_greedy(model, PROMPTS[0], 5)
        with pytest.raises(RuntimeError, match="before start"):
            engine.warm_up()


@pytest.mark.slow
def test_compiled_prefill_matches_a_full_pass_with_one_graph_for_every_length():
    # chunks of 8: prompts of 3, 7, 11 (8 + 3), 9 (8 + a one-token chunk, run eagerly) and 18 (8 + 8 + 2)
    # tokens; after the first compile no other length compiles again, and scoring (every position's
    # logits) compiles once more
    from torch._dynamo.utils import counters

    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1), max_batch=4, max_seq_len=96, prefill_chunk=8, compile=True)
    prompts = [PROMPTS[0][:3], PROMPTS[2], PROMPTS[1], [9] * 9, PROMPTS[4]]
    with torch.inference_mode():
        full = [model(torch.tensor([p]))[0] for p in prompts]  # [T, V] each
    decoder.prefill([prompts[0]], [1])
    graphs = counters["stats"]["unique_graphs"]
    last = decoder.prefill(prompts[1:], [0, 1, 2, 3])
    assert counters["stats"]["unique_graphs"] == graphs
    for got, want in zip(last, full[1:]):
        torch.testing.assert_close(got, want[-1], atol=1e-4, rtol=1e-4)
    _, scored = decoder.score_prompt(prompts[4], 3, top=0)
    assert counters["stats"]["unique_graphs"] == graphs + 1 and decoder.compiled  # (not fallen back to eager)
    want = torch.log_softmax(full[4][:-1], dim=-1).gather(1, torch.tensor(prompts[4][1:])[:, None])[:, 0]
    assert [lp.logprob for lp in scored[1:]] == pytest.approx(want.tolist(), abs=1e-4)
    # a prompt that starts like what slot 3 holds: its chunk starts mid-cache, with the graph it had
    longer = prompts[4] + [5, 6, 7]
    assert decoder.reusable(longer, 3) == len(prompts[4])
    with torch.inference_mode():
        torch.testing.assert_close(decoder.prefill([longer], [3])[0], model(torch.tensor([longer]))[0, -1],
                                   atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs + 1


@pytest.mark.slow
def test_compiled_step_writes_the_cache_in_place_and_builds_the_bias_once(monkeypatch):
    # Read from the code inductor generates for the GPU's attention path (SDPA with the bias), compiled on
    # the CPU. torch 2.11 turned a cache write through a view into copies of the whole cache in every layer
    # (loops over all of it), and each layer's SDPA input rebuilt the bias: one bias buffer per layer.
    from torch._inductor.utils import run_and_get_code

    sdpa_attention = model_module.cached_attention
    monkeypatch.setattr(model_module, "cached_attention",
                        lambda q, k, v, bias, fused=None, start=0: sdpa_attention(q, k, v, bias, True, start))
    decoder = Decoder(random_model(CFG, seed=1), max_batch=4, max_seq_len=96, compile=True)
    tokens, pos = torch.tensor([[7]]), torch.tensor([[5]])
    with torch.inference_mode():
        _, codes = run_and_get_code(decoder._compiled_step, tokens, pos, decode.MIN_KV_BUCKET)
    code = codes[-1]
    loop_lengths = [int(n) for n in re.findall(r"< ?static_cast<int64_t>\((\d+)L\)", code)]
    cache_half = decoder.model.layers[0].attention.cache.kv[0].numel()  # all the keys (or values) of a layer
    assert loop_lengths and max(loop_lengths) < cache_half
    assert len(re.findall(r"empty_strided_cpu\(\(1, 1, 1, ", code)) == 1  # the bias [rows, 1, 1, positions]


@pytest.mark.slow
def test_compiled_decode_step_of_an_int8_model_same_greedy_tokens():
    # the compiled step of a quantised model (on a GPU with gpt-fast's tuning option) traces the widening
    # matmul, not the CPU kernels, and decodes what the eager quantised model decodes
    model = quantize(random_model(CFG, seed=1), "int8")
    decoder = Decoder(quantize(random_model(CFG, seed=1), "int8"), max_batch=2, max_seq_len=96, compile=True)
    out = run(Scheduler(decoder, stop_ids=()), {0: [(p, SamplingParams(max_new_tokens=6)) for p in PROMPTS[:2]]})
    assert [out[i].tokens for i in range(2)] == [naive_greedy(model, p, 6) for p in PROMPTS[:2]]


@pytest.mark.slow
def test_compile_options_reach_the_compiler():
    # bench_decode.py compares inductor settings in one process: a decoder compiled with other options
    # compiles its own graph (torch.compile would otherwise reuse another decoder's)
    from torch._dynamo.utils import counters

    Decoder(random_model(CFG, seed=1), max_batch=2, max_seq_len=96, compile=True).decode([0], [5], [3])
    graphs = counters["stats"]["unique_graphs"]
    tuned = Decoder(random_model(CFG, seed=1), max_batch=2, max_seq_len=96,
                    compile={"coordinate_descent_tuning": True})
    tuned.decode([0], [5], [3])
    assert tuned.compiled and tuned.compile_options and counters["stats"]["unique_graphs"] == graphs + 1


@pytest.mark.slow
def test_a_decode_step_that_cannot_compile_decodes_eagerly(caplog):
    # a real compile failure: inductor's C++ compiler is missing (on a GPU machine: no triton, no gcc)
    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1), max_batch=2, max_seq_len=96, compile=True)
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler",), "fx_graph_cache": False}):
        out = run(Scheduler(decoder, stop_ids=()), {0: [(PROMPTS[0], SamplingParams(max_new_tokens=4))]})
    assert out[0].tokens == naive_greedy(model, PROMPTS[0], 4)
    assert not decoder.compiled and "could not compile the prefill and decode steps" in caplog.text


def test_a_compiled_decoders_cache_only_grows_and_doubles_its_positions(monkeypatch):
    # each cache size compiles the steps anew: a chat's growing turns must not make a new size every turn
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    decoder = Decoder(random_model(CFG, seed=1), max_batch=1, max_seq_len=10, compile=True)
    shapes = [decoder.model.cache_shape]
    for rows, length in ((1, 20), (2, 20), (1, 12), (1, 90), (1, 100)):
        decoder.ensure(rows, length, limit=100)
        shapes.append(decoder.model.cache_shape)
    assert shapes == [(1, 16), (1, 32), (2, 32), (2, 32), (2, 96), (2, 104)]
    eager = Decoder(random_model(CFG, seed=1), max_batch=1, max_seq_len=10, compile=False)
    eager.ensure(1, 20, limit=100)  # eager steps take any size: the cache is what is asked for
    assert eager.model.cache_shape == (1, 20)


@pytest.mark.slow
def test_compiled_steps_past_dynamos_recompile_limit_decode_eagerly(monkeypatch, caplog):
    # each cache size compiles the steps anew (dynamo guards on the cache's shape) and a Generator's cache grows
    # with its calls: past dynamo's recompile limit a fullgraph compile raises (FailOnRecompileLimitHit), and
    # generate() failed on the GPU after a few calls of growing lengths. Traced onto eager kernels (fast).
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph, dynamic, options: compile_(
        fn, fullgraph=fullgraph, dynamic=dynamic, backend="eager"))
    model = random_model(CFG, seed=1)
    gen = Generator(random_model(CFG, seed=1), compile=True)
    prompt = PROMPTS[0][:3]
    with torch._dynamo.config.patch(recompile_limit=2):  # 8 by default (conftest: 64)
        for n in (4, 12, 20, 28):  # caches of 8, 16, 24 and 32 positions
            tokens = gen.generate([prompt], SamplingParams(max_new_tokens=n))[0].tokens
            assert tokens == naive_greedy(model, prompt, n)
    assert not gen._decoder.compiled and "recompile_limit" in caplog.text


@pytest.mark.slow
def test_warm_up_compiles_every_variant_the_engine_thread_needs(monkeypatch):
    # after warm_up the serving thread reuses its compiled graphs: more rows and longer positions
    # (other buckets) compile nothing new
    from torch._dynamo.utils import counters

    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    model = random_model(CFG, seed=1)
    engine = Engine(random_model(CFG, seed=1), max_batch=4, context_len=96, compile=True)
    engine.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    with engine:
        out = engine.generate(PROMPTS[:3], SamplingParams(max_new_tokens=12))
    assert [o.tokens for o in out] == [naive_greedy(model, p, 12) for p in PROMPTS[:3]]
    assert counters["stats"]["unique_graphs"] == graphs and engine.decoder.compiled


def test_engine_thread_shares_the_cuda_graph_trees_of_the_thread_that_started_it(model):
    # warm_up records CUDA graphs on this thread; the engine thread must find them (and, on torch 2.11,
    # find the trees' thread-local at all: pytorch#123177)
    import torch._inductor.cudagraph_trees  # noqa: F401

    seen = []
    engine = Engine(model, max_batch=2, context_len=96, compile=True)
    for _ in range(3):  # a thread that ends must leave the state alive (torch 2.11 freed it: a segfault)
        with engine:  # a one-token prompt and one new token: an eager prefill only, nothing compiles
            req = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=1),
                                lambda ev: seen.append(torch._C._get_obj_in_tls("tree_manager_containers")))
            while not req.finished:
                time.sleep(0.01)
        gc.collect()
    assert len(seen) == 3 and all(obj is torch._C._get_obj_in_tls("tree_manager_containers") for obj in seen)


def test_eager_step_reads_the_used_cache_positions_rounded_to_8():
    decoder = Decoder(random_model(CFG, seed=1), max_batch=4, max_seq_len=36)  # projections not stacked: eager
    calls = []
    eager_step = decoder._eager_step

    def step(tokens, pos, kv_len):
        calls.append((tokens.shape[0], kv_len))
        return eager_step(tokens, pos, kv_len)

    decoder._eager_step = step
    decoder.prefill([PROMPTS[0], PROMPTS[1]], [0, 2])
    decoder.decode([0, 2], [7, 8], [5, 11])  # exactly rows 0..2; 12 positions -> 16
    decoder.decode([0], [7], [34])  # 35 -> 40, capped at the cache's 36
    assert calls == [(3, 16), (1, 36)]
