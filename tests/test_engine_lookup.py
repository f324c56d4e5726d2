"""Prompt lookup: guessed tokens checked in one step give the tokens of one step per token, in fewer steps
(engine/lookup.py, engine/batching.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from codellama.config import ModelConfig
from codellama.engine.batching import Scheduler
from codellama.engine.cpu_decode import FusedCPUDecode
from codellama.engine.decode import Decoder
from codellama.engine.lookup import draft
from codellama.sampling import SamplingParams
from helpers import eager_or_fused, naive_penalized_greedy

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=128, rope_theta=1e6,
                  max_seq_len=512, eos_id=None)


def test_draft_copies_what_followed_the_latest_earlier_occurrence():
    assert draft([1, 2, 3, 9, 9, 1, 2, 3], 3) == [9, 9, 1]  # the 3-gram 1 2 3 occurred before
    assert draft([1, 2, 3, 4, 7, 2, 3, 5, 8, 2, 3], 2) == [5, 8]  # the latest of two occurrences
    assert draft([5, 2, 3, 6, 9, 1, 2, 3], 4) == [6, 9, 1, 2]  # no earlier 1 2 3: the 2-gram 2 3
    assert draft([4, 5, 6, 7, 8, 6], 4) == []  # a 1-gram match is too weak to guess from
    assert draft([1, 2, 1, 2], 4) == [1, 2]  # the match may overlap the tail
    assert draft([1, 2], 4) == [] and draft([], 4) == []


@pytest.fixture(scope="module")
def fused():
    return eager_or_fused(CFG, "fused")


def run(model, prompts: list[list[int]], params: list[SamplingParams], lookup: int) -> tuple[list, int]:
    """Each prompt's completion, and the number of steps the scheduler took."""
    model.clear_cache()
    scheduler = Scheduler(Decoder(model, len(prompts), CFG.max_seq_len), CFG.max_seq_len, lookup=lookup)
    reqs = [scheduler.submit(p, sp, decode=lambda ids: " ".join(map(str, ids))) for p, sp in zip(prompts, params)]
    steps = 0
    while scheduler.has_work:
        scheduler.step()
        steps += 1
    return [r.row.completion() for r in reqs], steps


def repetitive(seed: int, n: int = 60) -> list[int]:
    """A prompt that repeats a random 12-token line: what follows its last tokens occurred before."""
    line = torch.randint(1, CFG.vocab_size, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
    return (line * (n // 12 + 1))[:n]


def test_guessed_tokens_give_the_same_completions_in_fewer_steps(fused):
    prompts = [repetitive(s) for s in range(4)]
    params = [SamplingParams(max_new_tokens=40, stop_ids=()),
              SamplingParams(max_new_tokens=40, stop_ids=(), stop=("13 ",)),  # a stop string, maybe mid-guess
              SamplingParams(max_new_tokens=7, stop_ids=()),  # its length ends inside a guess
              SamplingParams(max_new_tokens=40, stop_ids=(), temperature=0.8, seed=5)]  # sampled: no guesses
    plain, plain_steps = run(fused, prompts, params, lookup=0)
    guessed, steps = run(fused, prompts, params, lookup=8)
    for a, b in zip(plain, guessed):
        assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)
    assert steps == plain_steps  # the sampled row takes one token per step
    alone = [run(fused, prompts[:1], params[:1], lookup) for lookup in (0, 8)]
    assert alone[0][0][0].tokens == alone[1][0][0].tokens
    assert alone[1][1] < 0.6 * alone[0][1]  # 21 steps instead of 39: the random model repeats its prompt
    # a stop token inside a guess ends the row there too
    stop_at = plain[0].tokens[20]
    stopped = [SamplingParams(max_new_tokens=40, stop_ids=(stop_at,))]
    assert run(fused, prompts[:1], stopped, 0)[0][0].tokens == run(fused, prompts[:1], stopped, 8)[0][0].tokens


def test_penalised_greedy_rows_take_one_token_per_step_beside_guessing_ones(fused):
    """A penalised row's logits change with each token it takes: it does not guess (guesses checked against
    the plain greedy choice would hold where its penalties change the token), and decodes as without lookup."""
    prompts = [repetitive(s) for s in range(3)]
    plain = SamplingParams(max_new_tokens=30, stop_ids=())
    # small penalties: the first 10-18 tokens repeat the prompt as the plain row's do, then they differ
    params = [replace(plain, frequency_penalty=0.05), replace(plain, frequency_penalty=0.1, logit_bias={0: 0.5}), plain]
    alone, alone_steps = run(fused, prompts, params, lookup=0)
    guessed, steps = run(fused, prompts, params, lookup=8)
    assert [c.tokens for c in guessed] == [c.tokens for c in alone]
    assert steps == alone_steps  # the penalised rows set the pace: one token per step
    plain_tokens = run(fused, prompts[:2], [plain, plain], lookup=0)[0]
    for c, p, sp, unpenalised in zip(alone, prompts, params, plain_tokens):
        assert c.tokens == naive_penalized_greedy(fused, p, 30, sp.presence_penalty, sp.frequency_penalty,
                                                  sp.logit_bias, sp.repetition_penalty)
        assert c.tokens != unpenalised.tokens


def test_what_a_slot_holds_after_guessing_is_what_was_fed(fused):
    """Positions written for wrong guesses are past the record: the next request reuses exactly the rest."""
    model = fused
    model.clear_cache()
    decoder = Decoder(model, 1, CFG.max_seq_len)
    scheduler = Scheduler(decoder, CFG.max_seq_len, lookup=8)
    prompt, params = repetitive(3), SamplingParams(max_new_tokens=30, stop_ids=())
    req = scheduler.submit(prompt, params)
    while scheduler.has_work:
        scheduler.step()
    assert decoder.held[0] == prompt + req.row.tokens[:-1]
    again = scheduler.submit(prompt + req.row.tokens + [5], params)  # prefilled from the record on
    while scheduler.has_work:
        scheduler.step()
    assert again.row.cached_tokens == len(prompt) + len(req.row.tokens) - 1
    alone, _ = run(model, [prompt + req.row.tokens + [5]], [params], lookup=0)
    assert again.row.tokens == alone[0].tokens


def test_lookup_needs_the_fused_step_and_a_sane_count(fused, capsys):
    eager = eager_or_fused(CFG, "eager")
    assert Scheduler(Decoder(eager, 1, 64), lookup=8).lookup == 0  # one row per slot there: off
    assert Scheduler(Decoder(fused, 1, 64), lookup=8).lookup == 8
    with pytest.raises(ValueError, match="lookup is a number of guessed tokens"):
        Scheduler(Decoder(fused, 1, 64), lookup=-1)
    from codellama.cli import main

    assert main(["complete", "x", "--lookup", "100"]) == 2  # refused before the model loads
    assert "--lookup must be 0 (off) to 64" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_rewriting_a_file_gives_the_same_answer_in_fewer_steps():
    """The real default model asked to return a file with type hints: its answer repeats the file, most
    guesses hold, and the tokens are those of one step per token."""
    from pathlib import Path

    from codellama.generate import load_for_inference
    from codellama.prompts import chat_tokens

    loaded = load_for_inference(None, "cpu", None, "auto")
    if FusedCPUDecode.for_model(loaded.model) is None:
        pytest.skip("the CPU kernels cannot be built here")
    source = (Path(__file__).parents[1] / "src/codellama/engine/lookup.py").read_text()
    prompt = chat_tokens(loaded.tokenizer, [{"role": "user", "content": "Add type hints and a docstring to every "
                                             "function of this code, and return the whole file:\n\n" + source}])
    params = SamplingParams(max_new_tokens=120)
    runs = {}
    for lookup in (0, 16):
        loaded.model.clear_cache()
        scheduler = Scheduler(Decoder(loaded.model, 1, len(prompt) + 130), lookup=lookup,
                              stop_ids=loaded.tokenizer.stop_ids)
        req = scheduler.submit(prompt, params)
        steps = 0
        while scheduler.has_work:
            scheduler.step()
            steps += 1
        runs[lookup] = (req.row.tokens, steps)
    assert runs[16][0] == runs[0][0] and len(runs[0][0]) == 120
    assert runs[16][1] < 0.6 * runs[0][1]
