"""Recipes: strict TOML loading, built-in stage recipes at every scale, batch arithmetic, LR schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from codellama.errors import UserError
from codellama.train.config import OptimSection, builtin_recipes, load_recipe, recipe_from_dict
from codellama.train.optim import lr_at

BASE = {
    "model": {"preset": "tiny"},
    "data": {"sources": [{"name": "code", "path": "code", "kind": "tokens"}]},
    "train": {"steps": 10, "seq_len": 8, "global_batch_tokens": 64},
}


def _with(**changes):
    import copy

    d = copy.deepcopy(BASE)
    for dotted, v in changes.items():
        *parents, last = dotted.split("__")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return d


def test_valid_recipe_builds_with_derived_batch():
    r = recipe_from_dict(BASE)
    assert r.train.global_batch_seqs == 8
    assert r.grad_accum(1) == 8 and r.grad_accum(2) == 4 and r.grad_accum(8) == 1
    assert r.optim.betas == (0.9, 0.95) and r.optim.final_lr_div == 30.0


@pytest.mark.parametrize(
    "data, words",
    [
        (_with(train__stepz=3), ["'train.stepz'", "steps", "seq_len"]),
        (_with(bogus=1), ["'bogus'", "stage", "optim"]),
        (_with(train__steps="10"), ["'train.steps'", "int", "str"]),
        (_with(train__steps=1.5), ["'train.steps'", "int"]),
        (_with(train__compile="yes"), ["'train.compile'", "bool"]),
        (_with(optim__lr="high"), ["'optim.lr'", "float"]),
        (_with(optim__betas=[0.9]), ["'optim.betas'", "2 numbers"]),
        (_with(data__sources=[{"name": "c", "path": "p", "wieght": 1}]), ["'data.sources[0].wieght'", "weight"]),
        (_with(data__sources={"name": "c"}), ["'data.sources'", "list"]),
        (_with(model="tiny"), ["'model'", "table"]),
        (_with(data__sources=[]), ["data.sources is empty"]),
        (_with(data__sources=[{"name": "c", "path": "p", "kind": "parquet"}]), ["kind", "shards", "chat"]),
        (_with(data__sources=[{"name": "c", "path": "p", "weight": 0}]), ["weight"]),
        (_with(train__global_batch_tokens=60), ["multiple of seq_len"]),
        (_with(train__dtype="fp8"), ["bf16", "fp32"]),
        (_with(stage="pretrain"), ["stage", "lcft"]),
        (_with(optim__betas=[0.9, 1.5]), ["betas"]),
        (_with(train__log_every=0), ["train.log_every must be > 0"]),
        (_with(train__ckpt_every=-1), ["train.ckpt_every", ">= 0"]),
        (_with(train__eval_batches=0), ["train.eval_batches must be >= 1", "eval_every = 0"]),  # ran 1 anyway
        (_with(model__rope_theta=-1e6), ["model.rope_theta must be > 0"]),  # was silently ignored
        (_with(train__out_dir=__file__), ["train.out_dir", "is a file"]),  # was a FileExistsError's traceback
    ],
)
def test_bad_recipes_name_the_key(data, words):
    with pytest.raises(UserError) as e:
        recipe_from_dict(data)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_world_size_must_divide_batch():
    r = recipe_from_dict(BASE)  # 8 sequences per step
    with pytest.raises(UserError, match="world size 3 does not divide the global batch of 8"):
        r.grad_accum(3)
    r = recipe_from_dict(_with(train__micro_batch=3))
    with pytest.raises(UserError, match="micro_batch 3"):
        r.grad_accum(1)


def test_overrides_and_scales():
    data = _with(scale="tiny")
    data["scales"] = {"tiny": {"train": {"steps": 3}}, "big": {"train": {"steps": 1000, "seq_len": 16}}}
    assert recipe_from_dict(data).train.steps == 3
    big = recipe_from_dict(data, scale="big")
    assert (big.train.steps, big.train.seq_len, big.scale) == (1000, 16, "big")
    r = recipe_from_dict(data, overrides=["train.steps=7", "optim.lr=1e-3", "train.out_dir=runs/x"])
    assert (r.train.steps, r.optim.lr, r.train.out_dir) == (7, 1e-3, "runs/x")
    with pytest.raises(UserError, match="unknown scale 'huge'.*tiny, big"):
        recipe_from_dict(data, scale="huge")
    with pytest.raises(UserError, match="'train.nope'"):
        recipe_from_dict(data, overrides=["train.nope=1"])
    with pytest.raises(UserError, match=r"recipe key 'scales.tiny' must be a table .*, got int 3"):
        recipe_from_dict({**data, "scales": {"tiny": 3}})
    with pytest.raises(UserError, match="KEY=VALUE"):
        recipe_from_dict(data, overrides=["train.steps"])
    with pytest.raises(UserError, match=r"--set data.sources: .* is not a TOML value; quote the strings"):
        recipe_from_dict(data, overrides=["data.sources=[{name=code, path=code}]"])  # was "must be a list, got str"
    home = recipe_from_dict(data, overrides=["train.out_dir=~/runs/x", "data.root=~/corpus"])
    assert (home.train.out_dir, home.data.root) == (str(Path.home() / "runs/x"), str(Path.home() / "corpus"))


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_recipe(str(bad))
    with pytest.raises(UserError, match="neither a file nor a built-in recipe.*code"):
        load_recipe(str(tmp_path / "missing.toml"))
    binary = tmp_path / "model.gguf"  # a checkpoint given as --recipe: was a UnicodeDecodeError's traceback
    binary.write_bytes(b"GGUF\x03\x00\x00\x00\x80\xff" * 10)
    with pytest.raises(UserError, match="not a TOML text file"):
        load_recipe(str(binary))


@pytest.mark.parametrize("name", ["code", "python", "lcft", "instruct"])
@pytest.mark.parametrize("scale", ["tiny", "smollm2", "7b"])
def test_builtin_recipes_load_at_every_scale(name, scale):
    assert {"code", "python", "lcft", "instruct"} <= set(builtin_recipes())
    r = load_recipe(name, scale=scale)
    assert r.stage == name and r.scale == scale
    assert r.optim.betas == (0.9, 0.95) and r.optim.final_lr_div == 30 and r.optim.grad_clip == 1.0
    weights = {s.name: s.weight for s in r.data.sources}
    total = sum(weights.values())
    share = {k: round(v / total, 4) for k, v in weights.items()}
    if name == "code":
        assert share == {"code": 0.85, "text_about_code": 0.08, "text": 0.07}
        assert r.data.fim_rate == 0.9 and r.data.fim_spm_rate == 0.5
    if name == "python":
        assert share == {"python": 0.75, "code": 0.10, "text_about_code": 0.10, "text": 0.05}
        assert r.data.fim_rate == 0.0  # 7B/13B/34B Python trained without infilling
    if name == "lcft":
        assert r.model.rope_theta == 1e6 and (r.optim.lr == 2e-5 or scale == "tiny")
    if name == "instruct":
        kinds = {s.name: s.kind for s in r.data.sources}
        assert kinds["instructions"] == "chat"
        assert share["code"] == 0.06 and share["text"] == 0.02  # rehearsal, spec 4.6
    if scale == "7b":  # the paper's constants (spec 4.4, 4.5)
        assert r.train.global_batch_tokens == {"instruct": 524288, "lcft": 2 * 2**20}.get(name, 4 * 2**20)
        assert r.train.seq_len == (16384 if name == "lcft" else 4096)
        if name == "code":
            assert r.train.steps == 125_000 and r.optim.warmup_steps == 1000 and r.optim.lr == 3e-4
        if name == "python":
            assert r.optim.lr == 1e-4 and r.train.steps == 25_000
        if name == "lcft":  # starts from the base model: the paper's 3,000 steps for Code Llama 7B
            assert r.train.steps == 3_000
    r.grad_accum(1)  # every scale's batch splits on one rank


def test_instruct_7b_descends_from_the_base_model_not_the_python_one():
    """Spec 4.1: Instruct 7B/13B/34B are trained from Code Llama (base) after LCFT. Following each stage's
    model.init back through the stages' out_dirs gives instruct <- lcft <- code (the lcft stage started from
    the Python model, so the instruct recipe trained Code Llama - Instruct from Code Llama - Python)."""
    by_out = {str(Path(load_recipe(n, scale="7b").train.out_dir) / "hf"): n for n in ("code", "python", "lcft")}
    lineage, init = ["instruct"], load_recipe("instruct", scale="7b").model.init
    while init in by_out:
        lineage.append(by_out[init])
        init = load_recipe(by_out[init], scale="7b").model.init
    assert lineage == ["instruct", "lcft", "code"]


def test_lr_schedule_warmup_then_cosine_to_peak_over_30():
    """Steps 0..109: a linear ramp to the peak at step 9, then a half cosine from there reaching peak/30 at
    the last step the run takes (109), each value once (no second step at the peak)."""
    o = OptimSection(lr=3e-4, warmup_steps=10, final_lr_div=30)
    total = 110
    lrs = [lr_at(s, total, o) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(3e-4 / 10)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))  # linear ramp
    assert lrs[9] == pytest.approx(3e-4)
    assert all(b < a for a, b in zip(lrs[9:total], lrs[10:total]))  # the cosine falls from the peak at once
    assert lrs[59] == pytest.approx((3e-4 + 1e-5) / 2)  # halfway: mid-point of peak and floor
    assert lrs[total - 1] == pytest.approx(3e-4 / 30) and lrs[total + 4] == pytest.approx(1e-5)
    assert min(lrs) == pytest.approx(1e-5)
    # the formula itself at an arbitrary point
    s = 37
    p = (s - 9) / 100
    assert lrs[s] == pytest.approx(1e-5 + 0.5 * (3e-4 - 1e-5) * (1 + math.cos(math.pi * p)))
    # no warm-up
    assert lr_at(0, 10, OptimSection(lr=1.0, warmup_steps=0)) == pytest.approx(1.0)
    assert lr_at(9, 10, OptimSection(lr=1.0, warmup_steps=0, final_lr_div=30)) == pytest.approx(1 / 30)
