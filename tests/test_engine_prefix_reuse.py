"""Prefix reuse: a prompt that starts like what a free cache slot holds is prefilled from where they differ,
and decodes what a whole prefill would (engine/decode.py, engine/batching.py)."""

from __future__ import annotations

import pytest
import torch

from codellama.config import ModelConfig
from codellama.engine.batching import Scheduler
from codellama.engine.decode import FUSED_PREFILL_MAX_PROMPT, MIN_REUSED_TOKENS, Decoder, common_prefix_len
from codellama.engine.quant import quantize
from codellama.generate import Generator
from codellama.sampling import SamplingParams
from helpers import eager_or_fused, naive_greedy, random_model

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=128, rope_theta=1e6,
                  max_seq_len=640, eos_id=None)
GREEDY = SamplingParams(max_new_tokens=6, stop_ids=())


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["eager", "fused"])
def weights(request):
    """The same weights run by the eager model, or (projections fused) by the fused CPU step."""
    return eager_or_fused(CFG, request.param)


@pytest.fixture
def model(weights):
    """The module's model with no KV cache: what its slots held lives with the cache, across Decoders."""
    weights.clear_cache()
    return weights


def test_common_prefix_len():
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([7], [1]) == 0
    assert common_prefix_len([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix_len([1, 2, 3], [1, 2, 3], limit=2) == 2
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix_len((1, 2), [1, 2, 3]) == 2  # a tuple and a list
    long = list(range(100_000))
    assert common_prefix_len(long, long[:77_777] + [-1] + long[77_778:]) == 77_777


# the rest after the held tokens: a few rows of the fused step, or (past FUSED_PREFILL_MAX_PROMPT) the
# model's chunked prefill starting in the middle of a chunk
@pytest.mark.parametrize("held,rest", [(40, 30), (150, FUSED_PREFILL_MAX_PROMPT + 50)])
def test_prefill_from_what_the_slot_holds_gives_a_whole_prefills_logits(model, held, rest):
    prompt = tokens(held + rest, seed=held)
    decoder = Decoder(model, 2, CFG.max_seq_len, prefill_chunk=64)
    decoder.prefill([prompt[:held]], [1])
    assert decoder.reusable(prompt, 1) == held and decoder.reusable(prompt, 0) == 0
    got = decoder.prefill([prompt], [1])[0]
    assert decoder.held[1] == prompt
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the whole prompt again: all but its last token, whose logits the prefill returns
    assert decoder.reusable(prompt, 1) == len(prompt) - 1
    torch.testing.assert_close(decoder.prefill([prompt], [1])[0], want, atol=1e-4, rtol=1e-4)


def test_a_conversation_reuses_its_history(model):
    """A second turn resends the first prompt and its answer: all of it is reused but the answer's last token
    (decoding never fed it back), and the greedy tokens are a whole recomputation's."""
    gen = Generator(model)
    first_prompt = tokens(30, seed=2)
    first = gen.generate([first_prompt], GREEDY)[0]
    assert first.cached_tokens == 0
    prompt = first_prompt + first.tokens + tokens(9, seed=3)
    second = gen.generate([prompt], GREEDY)[0]
    assert second.cached_tokens == len(first_prompt) + len(first.tokens) - 1
    assert second.tokens == naive_greedy(model, prompt, GREEDY.max_new_tokens)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_request_goes_to_the_free_slot_holding_the_start_of_its_prompt(model, overlap):
    decoder = Decoder(model, 3, CFG.max_seq_len)
    shared = tokens(40, seed=4)
    decoder.prefill([[5] * 20, shared], [0, 2])  # slot 0 holds something else, slot 2 the shared start
    sched = Scheduler(decoder, stop_ids=(), overlap=overlap)
    a = sched.submit(shared + [7, 8], GREEDY)  # 40 tokens held in slot 2
    b = sched.submit(shared[: MIN_REUSED_TOKENS - 1] + [3], GREEDY)  # too few: the empty slot
    b_slot = 1
    done = {}
    while sched.has_work:
        done.update((req.id, ev.completion) for req, ev in sched.step() if ev.completion is not None)
        if a.slot is not None:
            assert (a.slot, b.slot) == (2, b_slot)
    assert (done[a.id].cached_tokens, done[b.id].cached_tokens) == (40, 0)
    for req in (a, b):
        assert done[req.id].tokens == naive_greedy(model, req.prompt, GREEDY.max_new_tokens)
    # what each slot holds now: the prompt and every generated token but the last
    assert decoder.held[2] == a.prompt + done[a.id].tokens[:-1]
    assert decoder.held[b_slot] == b.prompt + done[b.id].tokens[:-1]


def test_a_dummy_rows_write_leaves_what_its_slot_held():
    """The eager step runs slots 0..n-1: a free slot among them gets a dummy token, written at the cache's
    last position, which no record covers."""
    model = random_model(CFG, seed=1)  # projections not stacked: the eager step, with dummy rows
    decoder = Decoder(model, max_batch=3, max_seq_len=64)
    held = tokens(63, seed=40)  # as long as a record gets: all but the last position
    decoder.prefill([held + [1], [7, 8]], [0, 1])
    assert decoder.held[0] == held
    for position in range(2, 6):
        decoder.decode([1], [9], [position])  # slot 0 carries the dummy row
    assert decoder.reused([held + [2]], [0]) == [len(held)]
    with torch.inference_mode():
        got = decoder.prefill([held + [2]], [0])[0]
        want = model(torch.tensor([held + [2]]))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_decoders_of_one_model_share_what_its_slots_hold(model):
    """Two Generators on one model write the same cache: neither may reuse what the other overwrote."""
    a, b = Generator(model), Generator(model)
    prompt = tokens(30, seed=5)
    a.generate([prompt], GREEDY)
    b.generate([tokens(25, seed=6)], GREEDY)  # slot 0 again
    longer = prompt + [1, 2, 3]
    out = a.generate([longer], GREEDY)[0]
    assert out.cached_tokens == 0 and out.tokens == naive_greedy(model, longer, GREEDY.max_new_tokens)
    model.setup_cache(1, 8)  # what a caller writing the cache itself does first: the record is forgotten
    assert a.generate([longer], GREEDY)[0].cached_tokens == 0


def test_without_reuse_every_prompt_is_prefilled_whole(model):
    gen = Generator(model, reuse_prefixes=False)
    prompt = tokens(30, seed=7)
    gen.generate([prompt], GREEDY)
    assert gen.generate([prompt], GREEDY)[0].cached_tokens == 0


def test_a_prompt_repeated_in_one_call_is_computed_once(model):
    """n samples of one prompt: prefilled in one slot, copied into the others (and the logits shared)."""
    gen = Generator(model)
    p, q = tokens(40, seed=8), tokens(12, seed=9)
    out = gen.generate([p, p, q, p], GREEDY)
    assert [c.cached_tokens for c in out] == [0, len(p), 0, len(p)]
    want = naive_greedy(model, p, GREEDY.max_new_tokens)
    assert [c.tokens for c in out] == [want, want, naive_greedy(model, q, GREEDY.max_new_tokens), want]
    decoder = gen._decoder
    with torch.inference_mode():
        logits = decoder.prefill([p, p], [0, 2])
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
    cache = model.layers[1].attention.cache
    assert torch.equal(cache.k[2, :, : len(p)], cache.k[0, :, : len(p)])
    assert torch.equal(cache.v[2, :, : len(p)], cache.v[0, :, : len(p)])


def test_a_prompt_copies_the_start_another_slot_holds(model):
    """Its own slot holds nothing of it; another does (a busy one too: decoding writes past its prompt)."""
    decoder = Decoder(model, 3, CFG.max_seq_len)
    shared = tokens(50, seed=10)
    decoder.prefill([shared], [1])
    prompt = shared + tokens(7, seed=11)
    assert decoder.reused([prompt], [0]) == [50]
    with torch.inference_mode():
        got = decoder.prefill([prompt], [0])[0]
        want = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # slot 0 now holds all of `prompt`, but a slot this very call overwrites is no source: slot 1's 50 tokens
    assert decoder.reused([prompt + [1]], [2]) == [len(prompt)]
    assert decoder.reused([prompt + [1], tokens(5, seed=12)], [2, 0]) == [50, 0]
    # fewer than MIN_REUSED_TOKENS are not worth a copy
    assert decoder.reused([shared[: MIN_REUSED_TOKENS - 1] + [2, 3]], [2]) == [0]


def test_prompts_of_one_call_sharing_a_start_compute_it_once(model):
    """Few-shot prompts: the first is prefilled, the others copy the examples from its slot, then go on."""
    gen = Generator(model)
    shots = tokens(45, seed=13)
    prompts = [shots + tokens(6, seed=14), shots + tokens(9, seed=15), tokens(20, seed=16)]
    out = gen.generate(prompts, GREEDY)
    assert [c.cached_tokens for c in out] == [0, len(shots), 0]
    assert [c.tokens for c in out] == [naive_greedy(model, p, GREEDY.max_new_tokens) for p in prompts]


def test_weights_changed_in_place_are_not_decoded_with_old_keys(model):
    """An optimizer step (or load_state_dict) between two calls writes the weights in place: what the slots
    held was computed with the old ones."""
    gen = Generator(model)
    prompt = tokens(30, seed=17)
    gen.generate([prompt], GREEDY)
    assert gen.generate([prompt + [4, 5]], GREEDY)[0].cached_tokens == len(prompt)  # unchanged weights: reused
    weight = model.layers[0].attention_norm.weight
    with torch.no_grad():
        weight.mul_(1.5)
    try:
        longer = prompt + [4, 5]
        out = gen.generate([longer], GREEDY)[0]
        assert out.cached_tokens == 0 and out.tokens == naive_greedy(model, longer, GREEDY.max_new_tokens)
        assert gen.generate([longer], GREEDY)[0].cached_tokens == len(longer) - 1  # unchanged since: reused
    finally:
        with torch.no_grad():
            weight.div_(1.5)


def test_a_slot_left_out_of_a_chained_step_keeps_what_its_request_fed():
    """Overlap (the GPU default): the chained step leaves out a row whose pending token is its last by length;
    the eager step runs slots 0..n-1, so that slot, below an active one, gets a dummy token (which must not
    overwrite what the request fed)."""
    model = random_model(CFG, seed=1)  # projections not stacked: the eager step, with dummy rows
    decoder = Decoder(model, 2, CFG.max_seq_len)
    sched = Scheduler(decoder, stop_ids=(), overlap=True)
    first = tokens(40, seed=20)
    a = sched.submit(first, SamplingParams(max_new_tokens=3, stop_ids=()))  # slot 0, ends first, by length
    sched.submit(tokens(30, seed=21), SamplingParams(max_new_tokens=4, stop_ids=()))  # slot 1, one step longer
    done = {}
    while sched.has_work:
        done.update((req.id, ev.completion) for req, ev in sched.step() if ev.completion is not None)
    prompt = first + done[a.id].tokens[:-1] + [3, 4, 5]
    assert decoder.reused([prompt], [0]) == [len(prompt) - 3]
    with torch.inference_mode():
        got = decoder.prefill([prompt], [0])[0]
        want = model(torch.tensor([prompt]))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_larger_cache_keeps_what_the_slots_held():
    model = random_model(CFG, seed=1)
    decoder = Decoder(model, 2, 64)
    prompt = tokens(40, seed=22)
    decoder.prefill([prompt], [1])
    decoder.ensure(3, 128)  # a new cache: more slots, more positions
    assert model.cache_shape == (3, 128) and decoder.reused([prompt + [1, 2]], [1]) == [len(prompt)]
    with torch.inference_mode():
        got = decoder.prefill([prompt + [1, 2]], [1])[0]
        want = model(torch.tensor([prompt + [1, 2]]))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    decoder.ensure(1, 200)  # fewer slots: slot 1's record goes with it
    assert decoder.held == {}


@pytest.mark.parametrize("where", ["built", "quantised"])
def test_a_model_made_under_inference_mode_generates(where):
    """Inference tensors have no version counter (weights_stamp read it: every prefill raised)."""
    with torch.inference_mode():
        model = random_model(CFG, seed=1)
        if where == "quantised":
            quantize(model, "int8")
    prompt = tokens(20, seed=23)
    gen = Generator(model)
    gen.generate([prompt], GREEDY)
    assert gen.generate([prompt + [1]], GREEDY)[0].cached_tokens == len(prompt)


def test_weights_replaced_through_data_are_noticed():
    """p.data = ... (vector_to_parameters, some optimizers' swaps) keeps the parameter's id and version."""
    model = random_model(CFG, seed=1)
    gen = Generator(model)
    prompt = tokens(30, seed=17)
    gen.generate([prompt], GREEDY)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data * 1.5
    longer = prompt + [4, 5]
    out = gen.generate([longer], GREEDY)[0]
    assert out.cached_tokens == 0 and out.tokens == naive_greedy(model, longer, GREEDY.max_new_tokens)


def test_a_prompt_matching_no_slot_takes_an_empty_one_then_the_oldest_record(model):
    """An editor's file outlives other clients' requests: they go to empty slots first, then evict the
    oldest record. Where steps run slots 0..n-1 (the eager step), the lowest free slot if none is below a
    busy one (see the next test)."""
    decoder = Decoder(model, 3, CFG.max_seq_len)
    decoder.prefill([tokens(30, seed=30)], [0])  # the editor's file
    decoder.prefill([tokens(30, seed=31)], [2])  # then another client's prompt
    sched = Scheduler(decoder, stop_ids=())
    slots = [sched._slot_for(tokens(20, seed=32 + i)) for i in range(3)]
    assert slots == ([1, 0, 2] if decoder.steps_exact_slots else [0, 1, 2])


def test_where_steps_run_slots_0_to_n_a_prompt_takes_a_free_slot_below_a_busy_one():
    """A free slot below the highest busy one costs the steps nothing: an empty one first, then the oldest
    record; above the busy ones, only the lowest free slot."""
    decoder = Decoder(random_model(CFG, seed=1), 6, CFG.max_seq_len)  # projections not stacked: eager
    assert not decoder.steps_exact_slots
    decoder.prefill([tokens(30, seed=50)], [1])
    decoder.prefill([tokens(30, seed=51)], [0])
    sched = Scheduler(decoder, stop_ids=())
    sched.free_slots.remove(3)  # busy
    assert [sched._slot_for(tokens(20, seed=52 + i)) for i in range(4)] == [2, 1, 0, 4]
