"""Long-context tasks: the key-retrieval haystack is valid code of the asked length with the key where
asked; scoring and the heat map; chunked perplexity equals a plain full-sequence pass."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from codellama.config import ModelConfig
from codellama.errors import UserError
from codellama.eval.runner import ModelAdapter
from codellama.eval.tasks.long_context import (
    QUESTION, Haystack, code_files, key_retrieval, parse_answer, perplexity_vs_length, token_nll,
)
from helpers import random_model


class ByteTokenizer:
    """A real (if simple) tokenizer: UTF-8 bytes, so token counts are exact and additive."""

    vocab_size = 256

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))


class ReaderGenerator:
    """Answers by reading the value out of the prompt (a perfect retriever), or a fixed wrong answer."""

    def __init__(self, perfect: bool):
        self.perfect = perfect
        self.tokenizer = ByteTokenizer()
        self.prompts: list[str] = []

    def complete(self, prompts, **kw):
        self.prompts += prompts
        out = []
        for p in prompts:
            value = re.search(r"used at the end\n    return (\d+)", p).group(1)
            out.append(f"{value}\n" if self.perfect else "7\n")
        return out


@pytest.mark.parametrize("position", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_haystack(position, seed):
    hay = Haystack(ByteTokenizer(), code_files())
    prompt, actual = hay.build(6000, position, 57, random.Random(seed))
    assert 0.9 * 6000 <= len(prompt.encode()) <= 6000
    assert prompt.endswith(QUESTION) and prompt.count("def my_function() -> int:") == 1
    assert "# Note that this function is used at the end\n    return 57\n" in prompt
    compile(prompt[: -len("assert my_function() == ")], "<haystack>", "exec")  # valid Python throughout
    at = prompt.index("def my_function") / len(prompt)
    # where asked (a large class between two boundaries put 0.5 anywhere from 0.18 to 0.82)
    assert abs(at - actual) < 0.05 and abs(actual - position) < 0.03


def test_haystack_too_short_for_the_code_says_so(tmp_path):
    for i in range(3):  # every block 3 kB: no file order fills 1000 bytes
        (tmp_path / f"m{i}.py").write_text(f"def f{i}():\n" + "    x = 1\n" * 300)
    with pytest.raises(UserError, match="--lengths of 1000 or more"):
        Haystack(ByteTokenizer(), code_files(tmp_path)).build(1000, 0.0, 57, random.Random(0))


def test_haystack_of_the_smallest_length_the_error_recommends_builds():
    """--lengths 1000 with the tiny model refused one example in a few ('use --lengths of 1000 or more'): one
    file order missed the budget by a large block, and no other order was tried."""
    from codellama.tokenizer import codellama_tokenizer

    hay = Haystack(codellama_tokenizer(), code_files())
    for position in (0.0, 0.2, 0.4, 0.5, 1.0):
        for seed in range(20):
            prompt, _ = hay.build(1000, position, 57, random.Random(f"0/1000/{position}/{seed}"))
            assert prompt.endswith(QUESTION)


def test_parse_answer():
    assert parse_answer("42)") == 42 and parse_answer(" 42\n") == 42 and parse_answer("(17") == 17
    assert parse_answer("x") is None


@pytest.mark.parametrize("perfect", [True, False])
def test_key_retrieval_table_and_heatmap(tmp_path, perfect):
    gen = ReaderGenerator(perfect)
    s = key_retrieval(ModelAdapter(gen), gen.tokenizer, tmp_path, lengths=(1500, 3000), positions=(0.0, 0.5),
                      examples=3, progress=False, plot=perfect)
    assert set(s["accuracy"]) == {"1500/0", "1500/0.5", "3000/0", "3000/0.5"}
    assert all(v == (1.0 if perfect else 0.0) for v in s["accuracy"].values())
    if perfect:
        assert (tmp_path / "key_retrieval.png").stat().st_size > 1000
    values = {int(re.search(r"return (\d+)\n\n", p).group(1)) for p in gen.prompts}
    assert all(10 <= v <= 99 for v in values) and len(values) > 3  # random two-digit keys
    # resumable: a rerun asks nothing new
    n = len(gen.prompts)
    key_retrieval(ModelAdapter(gen), gen.tokenizer, tmp_path, lengths=(1500, 3000), positions=(0.0, 0.5), examples=3,
                  progress=False, plot=False)
    assert len(gen.prompts) == n
    assert json.loads((tmp_path / "summary.json").read_text())["examples"] == 3


def test_key_retrieval_rerun_with_fewer_examples_reports_those(tmp_path):
    """A rerun with fewer --examples (or --limit) summarised every saved example, and said `examples` = fewer."""
    def run_with(perfect: bool, examples: int) -> dict:
        gen = ReaderGenerator(perfect)
        return key_retrieval(ModelAdapter(gen), gen.tokenizer, tmp_path, lengths=(1500,), positions=(0.0,),
                             examples=examples, progress=False, plot=False)

    assert run_with(True, 2)["accuracy"] == {"1500/0": 1.0}
    assert run_with(False, 4)["accuracy"] == {"1500/0": 0.5}  # examples 2 and 3 answered wrong
    assert run_with(False, 2)["accuracy"] == {"1500/0": 1.0}  # nothing new asked: the first two, both right


def test_key_retrieval_length_shorter_than_the_key_itself_is_refused(tmp_path):
    """`--lengths 8,16` (meant as thousands) built prompts of just the key and the question, far longer than 8
    tokens, and reported 100% accuracy at "8 tokens"; now refused before anything is asked."""
    gen = ReaderGenerator(True)
    with pytest.raises(UserError, match="--lengths 30 leaves no room for a haystack.*lengths count tokens"):
        key_retrieval(ModelAdapter(gen), gen.tokenizer, tmp_path, lengths=(1500, 30), positions=(0.0,), examples=1,
                      progress=False, plot=False)
    assert gen.prompts == [] and not (tmp_path / "results.jsonl").exists()

def tiny_cfg() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, ffn_hidden=128, max_seq_len=4096)


def test_chunked_nll_equals_full_pass():
    model = random_model(tiny_cfg())
    ids = list(range(1, 200)) + [5] * 100
    nll = token_nll(model, ids, chunk=64)
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None])[0]  # plain causal pass, no cache
        ref = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    assert torch.allclose(torch.tensor(nll), ref, atol=1e-4)


def test_perplexity_vs_length(tmp_path):
    model = random_model(tiny_cfg())

    s = perplexity_vs_length(model, ByteTokenizer(), tmp_path, lengths=(256, 1024), max_files=2, progress=False)
    ppl = s["perplexity"]
    assert set(ppl) == {"256", "1024"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert (tmp_path / "perplexity_vs_length.png").exists() and len(s["files"]) == 2


def test_key_retrieval_results_of_another_model_are_not_reused(tmp_path):
    from codellama.errors import UserError
    from codellama.eval.runner import EvalConfig, run_task

    def cfg(model: str, **kw) -> EvalConfig:
        return EvalConfig(task="long-context-key-retrieval", model=model, out=tmp_path, progress=False,
                          extra={"lengths": (1500,), "positions": (0.5,), "examples": 2}, **kw)

    assert run_task(cfg("reader"), ModelAdapter(ReaderGenerator(True)))["accuracy"] == {"1500/0.5": 1.0}
    assert run_task(cfg("reader"), ModelAdapter(ReaderGenerator(True)))["accuracy"] == {"1500/0.5": 1.0}  # resumed
    summary = json.loads((tmp_path / "summary.json").read_text())  # says which model, as other tasks' do
    assert (summary["model"], summary["quantize"], summary["dtype"]) == ("reader", "none", None)
    with pytest.raises(UserError, match="other settings"):  # was: the reader's 100% reported as this model's
        run_task(cfg("guesser"), ModelAdapter(ReaderGenerator(False)))
    with pytest.raises(UserError, match="quantize 'none' -> 'int8'"):
        run_task(cfg("reader", quantize="int8"), ModelAdapter(ReaderGenerator(True)))
    run = json.loads((tmp_path / "run.json").read_text())
    del run["quantize"], run["dtype"]  # a run.json written before they were recorded: resumes under the defaults
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert run_task(cfg("reader"), ModelAdapter(ReaderGenerator(True)))["accuracy"] == {"1500/0.5": 1.0}


def test_key_retrieval_runs_past_the_models_own_context(tmp_path, codellama):
    """Tab. 17 asks 24k-token prompts of models trained at 16k: the model is loaded with the context the
    lengths need (the tiny preset's own is 512 tokens; before, such a prompt was refused)."""
    from codellama.eval.runner import EvalConfig, run_task

    cfg = EvalConfig(task="long-context-key-retrieval", model="tiny", out=tmp_path, progress=False,
                     extra={"lengths": (1200,), "positions": (0.5,), "examples": 1})
    assert set(run_task(cfg)["accuracy"]) == {"1200/0.5"}


def test_key_retrieval_from_the_command_line_runs_past_the_models_own_context(tmp_path, capsys, codellama):
    """`codellama eval` loads the model once for all its tasks, with its own context: the key-retrieval prompts
    past it were refused ("prompt 0 is 1196 tokens, 685 more than the context of 512 allows"). It runs them,
    and says that is past the context the model was trained for."""
    from codellama.cli import main

    with pytest.warns(UserWarning, match="a context of 1264 is past the 512 tokens .* was trained for"):
        assert main(["eval", "--task", "long-context-key-retrieval", "--model", "tiny", "--lengths", "1200",
                     "--positions", "0.5", "--examples", "1", "--out", str(tmp_path), "--device", "cpu"]) == 0, \
            capsys.readouterr().err
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


def test_key_retrieval_holds_one_long_prompt_in_the_cache(tmp_path, codellama):
    """The eval's default --batch-size 8 sized the KV cache for 8 prompts of the longest length (8 x 24k
    positions on the 7B: 100 GB) to share 4 decode steps; one prompt at a time needs one slot."""
    from codellama.eval.runner import EvalConfig, run_task

    cfg = EvalConfig(task="long-context-key-retrieval", model="tiny", out=tmp_path, progress=False, batch_size=8,
                     extra={"lengths": (1200,), "positions": (0.0, 0.5), "examples": 2})
    adapter = ModelAdapter.load("tiny", "cpu", cfg.batch_size, max_seq_len=1300)
    run_task(cfg, adapter)
    assert adapter.generator.model.cache_shape[0] == 1
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("option, msg", [(["--examples", "-1"], "--examples must be >= 1"),
                                         (["--examples", "0"], "--examples must be >= 1"),
                                         (["--positions", "0,1.5"], "between 0 and 1")])
def test_key_retrieval_bad_options_say_what_is_wrong(tmp_path, capsys, option, msg):
    from codellama.cli import main

    # refused before the model loads (there is none here); -1 was a matplotlib traceback, 0 meant 64
    assert main(["eval", "--task", "long-context-key-retrieval", "--model", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o"), *option]) == 2
    assert msg in capsys.readouterr().err
