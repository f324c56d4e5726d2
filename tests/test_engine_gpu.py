"""On a GPU: the decode path queues work without waiting for the device (what overlapped decoding needs),
the compiled step (CUDA graphs, buckets of rows and positions; also with FlexAttention, and with our own
CUDA graphs) decodes the eager model's greedy tokens and leaves what free slots held, and the compiled
prefill computes the eager model's logits; with a second GPU, all of it for a model on cuda:1.

Skipped without CUDA; `bash bench/gpu_checks.sh tests` runs this file on the device machine.
"""

from __future__ import annotations

import re

import pytest
import torch

from codellama.engine import decode
from codellama.engine.batching import Engine, Scheduler
from codellama.engine.decode import Decoder
from codellama.engine.host import HostTokens, staging, to_device
from codellama.generate import Generator
from codellama.sampling import RowSampler, SamplingParams, TokenHistory
from helpers import naive_greedy, naive_penalized_greedy, random_model
from test_engine_batching import CFG, PROMPTS, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU (a model on cuda:1)")


def gpu_busy() -> torch.cuda.Event:
    """Keep the GPU busy for a while (about a second); the event completes when it is done."""
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # clock cycles
    done = torch.cuda.Event()
    done.record()
    return done


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_decode_step_is_queued_without_waiting_for_the_gpu(compiled):
    decoder = Decoder(random_model(CFG, seed=1).cuda(), max_batch=4, max_seq_len=96, compile=compiled)
    decoder.prefill([PROMPTS[0], PROMPTS[1]], [0, 2])
    for _ in range(3):  # compile, warm up and record the graph first
        decoder.decode([0, 2], [7, 8], [5, 11])
    # the previous step's samples, as the overlap feeds them; made first: a copy from pageable host memory
    # waits for the GPU (which is what the decode step itself must avoid)
    tokens = torch.tensor([7, 8], device="cuda")
    done = gpu_busy()
    logits = decoder.decode([0, 2], tokens, [5, 11])
    assert not done.query(), "the host waited for the GPU while queueing a decode step"
    assert logits.shape == (2, CFG.vocab_size)


@pytest.mark.parametrize("attention, graphs", [("sdpa", "trees"), ("flex", "trees"), ("sdpa", "manual")])
def test_compiled_step_same_greedy_tokens_across_buckets(monkeypatch, attention, graphs):
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1).cuda(), max_batch=4, max_seq_len=96, compile=True,
                      attention=attention, graphs=graphs)
    lengths = [8, 3, 6]
    out = run(Scheduler(decoder, stop_ids=(), overlap=True),
              {0: [(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]})
    assert [out[i].tokens for i in range(3)] == [naive_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    assert decoder.compiled  # (not fallen back to eager)


def test_penalised_sampling_is_queued_without_waiting_for_the_gpu():
    # the sampler of a batch with penalties and biases, built and run while the GPU is busy (overlap builds
    # one whenever the batch changes, between queueing steps)
    params = [SamplingParams(frequency_penalty=1.0, logit_bias={3: 5.0}, repetition_penalty=1.3), SamplingParams(),
              SamplingParams(temperature=0.8, presence_penalty=-1.0, seed=1)]
    history = TokenHistory.empty(4, CFG.vocab_size, torch.device("cuda"))
    counts = history.generated
    logits = torch.randn(3, CFG.vocab_size, device="cuda")
    done = gpu_busy()
    history.start(2, [5, 6, 5])
    sampler = RowSampler.build(params, torch.device("cuda"), history=history, slots=[2, 0, 3])
    tokens = sampler.sample(logits)
    assert not done.query(), "the host waited for the GPU while building or running a penalised sampler"
    assert counts.sum().item() == 2 and counts[2, tokens[0]].item() == 1 and counts[3, tokens[2]].item() == 1


def test_small_copies_go_through_the_staging_chunks_until_one_is_still_in_flight():
    # every chunk lent while the GPU is busy; the next copy must not overwrite a chunk whose copy has not run
    stage = staging(torch.device("cuda"))
    done = gpu_busy()
    copies = [(list(range(i, i + 3)), to_device(range(i, i + 3), torch.device("cuda"))) for i in range(stage.CHUNKS)]
    assert stage.copy(torch.tensor([1.5]), torch.device("cuda")) is None  # the next chunk's copy is queued
    last = to_device([2.5, -1.0], torch.device("cuda"), torch.float32)  # through torch's pinned memory instead
    assert not done.query(), "the host waited for the GPU while copying through the staging buffer"
    assert all(t.tolist() == values for values, t in copies) and last.tolist() == [2.5, -1.0]
    assert stage.copy(torch.tensor([7, 8]), torch.device("cuda")).tolist() == [7, 8]  # lent again once run


def test_compiled_overlapped_steps_apply_penalties_and_biases():
    # overlap chains each step on the device's sampled tokens: the counts must include the token the host
    # has not read yet
    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1).cuda(), max_batch=2, max_seq_len=96, compile=True)
    settings = [dict(frequency_penalty=2.0), {}, dict(presence_penalty=1.5, logit_bias={4: 3.0, 86: -100}),
                dict(repetition_penalty=1.8)]
    arrivals = {0: [(p, SamplingParams(max_new_tokens=10, **kw)) for p, kw in zip(PROMPTS[1:], settings)]}
    out = run(Scheduler(decoder, stop_ids=(), overlap=True), arrivals)
    for i, (p, kw) in enumerate(zip(PROMPTS[1:], settings)):
        assert out[i].tokens == naive_penalized_greedy(model, p, 10, **kw), i


def test_our_cuda_graphs_are_recorded_again_over_a_reallocated_cache():
    # a Generator grows its cache for more prompts: graphs recorded over the old one must not replay. The
    # second call ends with steps of one row at the first call's bucket (one row, the fewest positions), the
    # one graph the first call recorded; slot 0 held another prompt there, so a stale graph reads wrong keys
    model = random_model(CFG, seed=1)
    gen = Generator(random_model(CFG, seed=1).cuda(), compile=True, graphs="manual")
    for prompts, lengths in (([PROMPTS[1]], [6]), ([PROMPTS[0], PROMPTS[2]], [8, 2])):  # 1 slot, then 2
        out = gen.generate(prompts, [SamplingParams(max_new_tokens=n) for n in lengths])
        assert [o.tokens for o in out] == [naive_greedy(model, p, n) for p, n in zip(prompts, lengths)]


def test_our_cuda_graphs_are_recorded_again_over_a_cache_set_up_elsewhere():
    # a new cache of the same size, set up by another user of the model (an eval task's own pass): the graphs
    # recorded over the old one must not replay. The old one is kept alive, so the new one has other addresses
    model = random_model(CFG, seed=1)
    gen = Generator(random_model(CFG, seed=1).cuda(), compile=True, graphs="manual")
    gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=6))
    old, shape = [layer.attention.cache for layer in gen.model.layers], gen.model.cache_shape
    gen.model.clear_cache()
    gen.model.setup_cache(*shape)
    out = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6))
    assert out[0].tokens == naive_greedy(model, PROMPTS[0], 6) and old


def test_compiled_steps_dummy_rows_leave_what_a_free_slot_held(monkeypatch):
    # steps over slots 0..2 with slots 0 and 1 free: their dummy rows write at the cache's last position,
    # so slot 0 still holds its prompt, and a prompt extending it is prefilled from where they differ
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    model = random_model(CFG, seed=1).cuda()
    decoder = Decoder(model, max_batch=4, max_seq_len=96, compile=True)
    held = PROMPTS[4]
    decoder.prefill([held, PROMPTS[0]], [0, 2])
    for position in range(len(PROMPTS[0]), len(PROMPTS[0]) + 4):
        decoder.decode([2], [7], [position])
    longer = held + [3, 4]
    assert decoder.reused([longer], [0]) == [len(held)]
    with torch.inference_mode():
        got = decoder.prefill([longer], [0])[0]
        want = model(torch.tensor([longer], device="cuda"))[0, -1]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_compiled_step_writes_the_cache_in_place_and_builds_the_bias_once():
    # the Triton code of the step (tests/test_engine_batching.py reads the CPU's): torch 2.11 turned the
    # cache write into copies of the whole cache in every layer, and rebuilt the bias in every layer
    from torch._inductor.utils import run_and_get_code

    decoder = Decoder(random_model(CFG, seed=1).cuda(), max_batch=4, max_seq_len=96, compile=True)
    tokens, pos = torch.tensor([[7]], device="cuda"), torch.tensor([[5]], device="cuda")
    with torch.inference_mode():
        _, codes = run_and_get_code(decoder._compiled_step, tokens, pos, decode.MIN_KV_BUCKET)
    code = "\n".join(codes)
    numels = [int(n) for n in re.findall(r"[xr]numel = (\d+)", code)]
    cache_half = decoder.model.layers[0].attention.cache.kv[0].numel()
    assert numels and max(numels) < cache_half
    assert len(re.findall(r"empty_strided_cuda\(\(1, 1, 1, ", code)) == 1  # the bias [rows, 1, 1, positions]


def test_compiled_prefill_matches_the_eager_model_in_bf16():
    # the compiled prefill chunk (SDPA with the bias over the repeated grouped heads, inductor's choice of
    # kernel) against the eager model, in chunks of 8 (prompts of 11 and 18 tokens: 8 + 3, 8 + 8 + 2)
    model = random_model(CFG, seed=1).cuda().bfloat16()
    decoder = Decoder(random_model(CFG, seed=1).cuda().bfloat16(), max_batch=4, max_seq_len=96, prefill_chunk=8,
                      compile=True)
    prompts = [PROMPTS[1], PROMPTS[4]]
    with torch.inference_mode():
        want = [model(torch.tensor([p], device="cuda"))[0, -1] for p in prompts]
        got = decoder.prefill(prompts, [0, 3])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)


def test_engine_warmed_up_then_serving_on_its_thread_decodes_the_greedy_tokens():
    # compiled and its first CUDA graphs recorded on the main thread (warm_up), then replayed, and graphs
    # for new buckets recorded, on the engine's thread, which shares the main thread's cudagraph trees
    model = random_model(CFG, seed=1)
    engine = Engine(random_model(CFG, seed=1).cuda(), max_batch=4, context_len=96)
    assert engine.decoder.compiled and engine.scheduler.overlap
    engine.warm_up()
    with engine:
        out = engine.generate(PROMPTS[:3], SamplingParams(max_new_tokens=8))
    assert [o.tokens for o in out] == [naive_greedy(model, p, 8) for p in PROMPTS[:3]]


@pytest.mark.parametrize("backend", ["default", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"])
@pytest.mark.parametrize("T", [1, 7])
def test_cached_attention_in_bf16_matches_the_definition(backend, T):
    # the shapes of Code Llama 70B's heads (64 query heads on 8 key/value heads, head_dim 128) in bf16,
    # whichever fused kernel SDPA picks on this card (cuDNN first on H100/H200) or is made to use
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from codellama.model import cached_attention

    torch.manual_seed(0)
    B, H, Hkv, S, hd = 2, 64, 8, 256, 128
    q = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(2, B + 1, Hkv, 2 * S, hd, device="cuda", dtype=torch.bfloat16)
    k, v = cache[0, :B, :, :S], cache[1, :B, :, :S]  # slices of a larger static cache, as decoding reads
    pos = torch.tensor([[100], [S - 1]], device="cuda") - torch.arange(T - 1, -1, -1, device="cuda")
    seen = torch.arange(S, device="cuda") <= pos[:, None, :, None]  # [B, 1, T, S]
    bias = torch.zeros(seen.shape, device="cuda", dtype=torch.bfloat16).masked_fill_(~seen, float("-inf"))
    g = H // Hkv
    kr, vr = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    ref = torch.softmax(q.float() @ kr.transpose(-1, -2) / hd**0.5 + bias.float(), dim=-1) @ vr
    try:
        if backend == "default":
            out = cached_attention(q, k, v, bias)
        else:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                out = cached_attention(q, k, v, bias)
    except RuntimeError as e:
        if "No available kernel" in str(e):
            pytest.skip(f"{backend} cannot run these inputs on this card")
        raise
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@two_gpus
def test_host_tokens_wait_for_their_copy_on_the_tokens_device():
    # the event was recorded on the current device's stream (cuda:0), not on cuda:1's where the copy runs
    tokens = torch.arange(5, device="cuda:1") * 3
    with torch.cuda.device(1):
        torch.cuda._sleep(2_000_000_000)  # the copy queues behind a second of work
    assert torch.cuda.current_device() == 0  # as on the engine's thread
    assert HostTokens(tokens).wait() == [0, 3, 6, 9, 12]


@two_gpus
@pytest.mark.parametrize("attention, graphs", [("sdpa", "trees"), ("flex", "trees"), ("sdpa", "manual")])
def test_compiled_overlapped_steps_on_the_second_gpu(monkeypatch, attention, graphs):
    # a model on cuda:1 while cuda:0 is current: FlexAttention's block mask was made on cuda:0, our graphs
    # captured nothing (their streams were cuda:0's), the sampled tokens were read before their copy landed
    monkeypatch.setattr(decode, "KV_UNIT", 4)
    monkeypatch.setattr(decode, "MIN_KV_BUCKET", 8)
    assert torch.cuda.current_device() == 0
    model = random_model(CFG, seed=1)
    decoder = Decoder(random_model(CFG, seed=1).to("cuda:1"), max_batch=4, max_seq_len=96, compile=True,
                      attention=attention, graphs=graphs)
    lengths = [8, 3, 6]
    out = run(Scheduler(decoder, stop_ids=(), overlap=True),
              {0: [(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, lengths)]})
    assert [out[i].tokens for i in range(3)] == [naive_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    assert decoder.compiled
