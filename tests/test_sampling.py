"""SamplingParams refuses values the sampler cannot hold, when they are given rather than deep in the engine.
(The other checks of SamplingParams and the sampler are in test_generate.py.)"""

from __future__ import annotations

import pytest
import torch

from codellama.errors import UserError
from codellama.sampling import RowSampler, SamplingParams, TokenHistory, filtered_probs


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=2**63), "top_k"),  # the sampler's int64 tensor: was an OverflowError when the batch was built
    (dict(seed=2**64), "seed"),  # torch.Generator.manual_seed takes int64 or uint64
    (dict(seed=-(2**63) - 1), "seed"),
])
def test_values_beyond_the_samplers_integers_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        SamplingParams(temperature=1.0, **kwargs)


def test_the_extremes_it_accepts_build_a_sampler():
    params = [SamplingParams(temperature=1.0, top_k=2**63 - 1, seed=2**64 - 1), SamplingParams(seed=-(2**63))]
    sampler = RowSampler.build(params, torch.device("cpu"))
    assert sampler.sample(torch.zeros(2, 5)).shape == (2,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(presence_penalty=2.5), "presence_penalty must be a number from -2 to 2"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(presence_penalty=True), "presence_penalty"),
    (dict(logit_bias={"5": 1.0}), "logit_bias keys must be token ids"),  # JSON's string keys, unparsed
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
    (dict(logit_bias={5: 100.5}), "logit_bias values must be numbers from -100 to 100, got 100.5 for token 5"),
    (dict(logit_bias={5: float("inf")}), "logit_bias values"),
    (dict(logit_bias=[5]), "logit_bias must map token ids"),
])
def test_penalties_and_biases_out_of_openais_ranges_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_ids_are_checked_against_the_vocabulary():
    params = SamplingParams(logit_bias={3: 1.0, 97: -5.0})
    params.check_vocab(98)
    with pytest.raises(UserError, match="logit_bias has token id 97, outside the model's vocabulary of 97"):
        params.check_vocab(97)
    assert SamplingParams(logit_bias=None).logit_bias == {} and not SamplingParams(logit_bias={}).adjusts_logits


def reference(logits: list[float], history: list[int], presence: float, frequency: float,
              bias: dict[int, float]) -> list[float]:
    """OpenAI's formula, one token at a time: mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j]."""
    return [mu - history.count(j) * frequency - (history.count(j) > 0) * presence + bias.get(j, 0.0)
            for j, mu in enumerate(logits)]


def test_penalties_and_biases_follow_openais_formula_and_leave_other_rows_alone():
    torch.manual_seed(0)
    V = 12
    logits = torch.randn(3, V)
    rows = [  # (params, tokens generated so far)
        (SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, logit_bias={2: 5.0, 9: -100}), [3, 3, 5, 11, 3]),
        (SamplingParams(), [1, 1, 1]),  # no penalties: its logits stay the model's
        (SamplingParams(frequency_penalty=2.0), [0, 7, 7]),
    ]
    seen = TokenHistory.empty(5, V, torch.device("cpu"))  # one line per slot; the rows sit in slots 4, 0, 2
    counts = seen.generated
    slots = [4, 0, 2]
    for slot, (_, history) in zip(slots, rows):
        counts[slot] = torch.bincount(torch.tensor(history), minlength=V).float()
    sampler = RowSampler.build([p for p, _ in rows], torch.device("cpu"), history=seen, slots=slots)
    adjusted = sampler.penalties.apply(logits)
    for i, (p, history) in enumerate(rows):
        want = reference(logits[i].tolist(), history, p.presence_penalty, p.frequency_penalty, p.logit_bias)
        torch.testing.assert_close(adjusted[i], torch.tensor(want))
    assert torch.equal(adjusted[1], logits[1])

    # greedy rows take the argmax of the adjusted logits, and the penalised rows count what they took
    before = counts.clone()
    tokens = sampler.sample(logits)
    assert tokens.tolist() == adjusted.argmax(-1).tolist()
    added = torch.zeros_like(counts)
    added[4, tokens[0]] = added[2, tokens[2]] = 1
    assert torch.equal(counts - before, added)  # slot 0's row has no penalties: not counted


def test_rows_with_penalties_need_a_history():
    with pytest.raises(ValueError, match="need the `history`"):
        RowSampler.build([SamplingParams(presence_penalty=1.0)], torch.device("cpu"))
    assert RowSampler.build([SamplingParams()], torch.device("cpu")).penalties is None  # the fast path


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_p=1.5), "min_p must be a number from 0 to 1"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number above 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
])
def test_min_p_and_repetition_penalty_out_of_range_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature,top_k,min_p", [(1.0, 0, 0.1), (0.7, 0, 0.3), (1.3, 20, 0.05)])
def test_min_p_keeps_the_tokens_transformers_keeps(temperature, top_k, min_p):
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    want = torch.softmax(MinPLogitsWarper(min_p)(None, scores), -1)  # [4, 64]
    rows = [SamplingParams(temperature=temperature, top_k=top_k, min_p=min_p)] * 4
    sampler = RowSampler.build(rows, torch.device("cpu"))
    got = filtered_probs(logits, sampler.temperature, sampler.top_p, sampler.top_k, sampler.unfiltered,
                         min_p=sampler.min_p)
    assert not sampler.unfiltered and 0 < int((want == 0).sum()) < want.numel()  # the test drops some tokens
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want)


def test_repetition_penalty_is_transformers_over_the_prompt_and_the_generated_tokens():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    V, prompts, generated = 32, [[3, 4, 4, 9], [0, 31], [5]], [[7, 3], [], [5, 5, 6]]
    logits = torch.randn(3, V) * 2
    history = TokenHistory.empty(4, V, torch.device("cpu"))
    slots = [3, 0, 1]
    params = [SamplingParams(repetition_penalty=p) for p in (1.3, 0.8, 2.0)]
    for slot, prompt, new in zip(slots, prompts, generated):
        history.start(slot, prompt)
        history.generated[slot] += torch.bincount(torch.tensor(new, dtype=torch.long), minlength=V)
    adjusted = RowSampler.build(params, torch.device("cpu"), history=history, slots=slots).penalties.apply(logits)
    for i, p in enumerate(params):
        seen = torch.tensor([prompts[i] + generated[i]])
        want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, logits[i:i + 1].clone())[0]
        torch.testing.assert_close(adjusted[i], want)
    history.start(3, [1])  # a new row in the slot forgets the old one's tokens
    assert history.in_prompt[3].nonzero().flatten().tolist() == [1] and not history.generated[3].any()


def test_top_p_1_keeps_every_token_where_another_setting_sorts_the_row():
    # top_k past the vocabulary, or a row batched with one that filters: the row takes the sorted path, where
    # the cumulative mass rounds past 1 before the tail (a third of these 32000 tokens were dropped)
    torch.manual_seed(0)
    logits = torch.randn(3, 32000) * 4
    rows = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=40000),
            SamplingParams(temperature=1.0, top_k=40)]
    sampler = RowSampler.build(rows, torch.device("cpu"))
    got = filtered_probs(logits, sampler.temperature, sampler.top_p, sampler.top_k, sampler.unfiltered,
                         min_p=sampler.min_p)
    want = torch.softmax(logits, -1)
    for row in (0, 1):
        assert int((got[row] == 0).sum()) == 0
        torch.testing.assert_close(got[row], want[row])
    assert int((got[2] > 0).sum()) == 40
