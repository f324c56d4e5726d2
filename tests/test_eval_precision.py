"""--dtype and --quantize on `codellama eval` and `codellama self-instruct`: the model loads as asked, run.json
records it, and a run resumes only under the settings its samples were made with (an older run.json, without
these keys, under the defaults). The model is the random-weight `tiny` preset: its answers are noise, the
pipeline is what is checked."""

from __future__ import annotations

import json

import pytest
import torch

from codellama.cli import build_parser, main
from codellama.engine.quant import QuantLinear
from codellama.eval.runner import EvalConfig, ModelAdapter

EVAL = ["eval", "--task", "humaneval", "--model", "tiny", "--device", "cpu", "--k", "1", "--max-new-tokens", "4",
        "--workers", "1", "--no-progress"]


def test_config_loads_the_model_with_its_dtype_and_quantisation(tmp_path, codellama):
    cfg = EvalConfig(task="humaneval", model="tiny", device="cpu", out=tmp_path, dtype="bfloat16", quantize="int8")
    model = ModelAdapter.for_config(cfg).generator.model
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert model.norm.weight.dtype == torch.bfloat16
    plain = ModelAdapter.for_config(EvalConfig(task="humaneval", model="tiny", device="cpu", out=tmp_path))
    assert not any(isinstance(m, QuantLinear) for m in plain.generator.model.modules())
    assert plain.generator.model.norm.weight.dtype == torch.float32  # the default: as eval always loaded


def test_quantised_run_is_recorded_and_resumes_only_with_the_same_quantisation(tmp_path, capsys, codellama):
    out = tmp_path / "he"
    assert main([*EVAL, "--limit", "1", "--out", str(out), "--quantize", "int8"]) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["quantize"] == "int8" and run["dtype"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_scored"] == 1 and (summary["quantize"], summary["dtype"]) == ("int8", None)
    capsys.readouterr()

    # executed again on its own, without the flags: the summary still says what the samples were made with
    assert main([*EVAL, "--limit", "1", "--out", str(out), "--phase", "execute"]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["quantize"] == "int8"
    capsys.readouterr()

    assert main([*EVAL, "--limit", "2", "--out", str(out)]) == 2  # the default: none
    err = capsys.readouterr().err
    assert "other settings (quantize 'int8' -> 'none')" in err and "use another --out" in err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1  # nothing mixed in


def test_run_json_of_an_older_version_resumes_under_the_defaults(tmp_path, capsys, codellama):
    out = tmp_path / "he"
    assert main([*EVAL, "--limit", "1", "--out", str(out), "--phase", "generate"]) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["quantize"] == "none" and run["dtype"] is None
    del run["quantize"], run["dtype"]  # as written before they were recorded
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")

    assert main([*EVAL, "--limit", "2", "--out", str(out), "--phase", "generate"]) == 0, capsys.readouterr().err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2  # resumed: one more sample
    capsys.readouterr()
    assert main([*EVAL, "--limit", "2", "--out", str(out), "--dtype", "bfloat16"]) == 2  # missing: read as float32
    assert "dtype None -> 'bfloat16'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "eval-sweep", "self-instruct"])
def test_commands_take_dtype_and_quantize_and_refuse_other_values(command, capsys):
    argv = [command, "--out", "x"]
    args = build_parser().parse_args(argv)
    assert (args.dtype, args.quantize) == (None, "none")  # unchanged: all floating point
    args = build_parser().parse_args([*argv, "--dtype", "bfloat16", "--quantize", "int4"])
    assert (args.dtype, args.quantize) == ("bfloat16", "int4")
    for flag, bad in (("--quantize", "int3"), ("--dtype", "float64")):
        with pytest.raises(SystemExit) as e:
            main([*argv, flag, bad])
        assert e.value.code == 2 and f"argument {flag}: invalid choice: '{bad}'" in capsys.readouterr().err


def test_bad_values_from_python_are_refused(tmp_path):
    from codellama.errors import UserError

    for kw, flag in (({"quantize": "int3"}, "--quantize"), ({"dtype": "float64"}, "--dtype")):
        with pytest.raises(UserError, match=flag):
            EvalConfig(task="humaneval", out=tmp_path, **kw)


def test_a_sweep_executed_alone_says_what_its_samples_were_made_with(tmp_path, capsys, codellama):
    sweep = ["eval-sweep", *EVAL[1:], "--limit", "1", "--n", "2", "--temperatures", "0.5", "--out", str(tmp_path)]
    assert main([*sweep, "--quantize", "int8", "--phase", "generate"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*sweep, "--phase", "execute"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().err.splitlines()[-1] == f"outputs in {tmp_path}"  # was a line of JSON
    result = json.loads((tmp_path / "temperature_sweep.json").read_text())
    assert (result["quantize"], result["dtype"]) == ("int8", None)
