"""Activation checkpointing and torch.compile, applied from outside the model, change no number and no
parameter name (so checkpoints stay interchangeable)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import train_worker as w
from codellama.model import Transformer
from codellama.train.data import InMemoryTokens
from codellama.train.distributed import DistEnv, build_from_scratch, init_params
from codellama.train.trainer import Trainer
from train_worker import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, compile: bool, ac: bool):
    r = w.recipe(str(tmp_path / f"c{compile}a{ac}"), 3)
    r.train.compile, r.train.activation_checkpointing, r.train.eval_every = compile, ac, 0
    t = Trainer(r, model_config=w.CFG, train_source=InMemoryTokens(w.corpus()[:3000], w.SEQ, 1), progress=False)
    losses = [x["loss"] for x in t.run() if x["kind"] == "train"]
    names = list(t.model.state_dict())
    t.close()
    return losses, names


def test_activation_checkpointing_changes_nothing(tmp_path):
    base, names = run(tmp_path, False, False)
    ac, ac_names = run(tmp_path, False, True)
    assert ac == base and ac_names == names


@pytest.mark.slow
def test_compile_with_activation_checkpointing(tmp_path):
    base, names = run(tmp_path, False, False)
    compiled, c_names = run(tmp_path, True, True)  # inductor on CPU: about half a minute
    assert c_names == names
    assert compiled == pytest.approx(base, rel=1e-4)


class _OneRankFSDP(DistEnv):
    """One rank that still takes parallelize's FSDP2 path (a process group of one)."""

    @property
    def distributed(self) -> bool:
        return True


@pytest.fixture
def process_group_of_one(tmp_path):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    yield _OneRankFSDP()
    dist.destroy_process_group()


def test_fsdp_bf16_computes_what_the_bf16_model_does(process_group_of_one):
    """FSDP2's bf16 mixed precision (N GPUs) gathers the weights in bf16 and changes nothing else: the RoPE
    tables stay float32 as under autocast (1 GPU) and at inference. FSDP2 cast every floating input of a
    block to bf16, cos and sin too: logits 4e-3 off the bf16 model's."""
    cfg = w.CFG.replace(dim=64, n_heads=4, ffn_hidden=128, max_seq_len=256, rope_theta=1e6)
    sharded = build_from_scratch(cfg, process_group_of_one, seed=0, bf16=True)
    plain = Transformer(cfg)
    init_params(plain, seed=0)
    plain = plain.to(torch.bfloat16)
    x = torch.randint(0, cfg.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sharded(x), plain(x), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_local_rank_past_the_visible_gpus_is_a_clear_error_or_the_one_gpu():
    # launchers that show each process its own GPU alone give it LOCAL_RANK > 0 and one device, cuda:0; more
    # processes than GPUs on a node was an "invalid device ordinal" traceback
    from codellama.errors import UserError
    from codellama.train.distributed import pick_device

    count = torch.cuda.device_count()
    assert pick_device("cuda", count - 1) == torch.device("cuda", count - 1)
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
        assert pick_device("auto", 3) == torch.device("cuda", 0)
    else:  # more processes than GPUs: two ranks on one GPU would fail in NCCL
        with pytest.raises(UserError, match=f"sees {count} CUDA devices"):
            pick_device("cuda", count)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_loaded_model_is_sharded_onto_the_gpu_a_block_at_a_time(tmp_path, monkeypatch):
    # a loaded model was moved whole to every GPU before FSDP2 sharded it (a 34B in float32: 135 GB per GPU);
    # now each fully_shard moves its own block. A process group of one (NCCL) takes the FSDP2 path; what the
    # GPU holds as each block is sharded is read as fully_shard (the real one) is called
    import torch.distributed.fsdp as fsdp

    from codellama.train.distributed import place_loaded

    held = []
    shard = fsdp.fully_shard
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: held.append(torch.cuda.memory_allocated())
                        or shard(module, **kw))
    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        cfg = w.CFG.replace(dim=256, n_layers=8, n_heads=4, ffn_hidden=1024, vocab_size=256)
        model = Transformer(cfg)
        block = sum(p.numel() * 4 for p in model.layers[0].parameters())
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        sharded = place_loaded(model, _OneRankFSDP(device=torch.device("cuda", 0)))
        assert all(p.device.type == "cuda" for p in sharded.parameters())
        assert held[0] - before < block  # nothing on the GPU yet as the first block is sharded
        assert all(b - a <= 1.1 * block for a, b in zip(held, held[1:]))  # then a block's shards at a time
    finally:
        dist.destroy_process_group()
