"""The public text API (codellama.load -> complete / infill / chat) and the run commands, on the tiny
preset with Code Llama's real vocabulary."""

from __future__ import annotations

import pytest

import codellama
from codellama.cli import main
from codellama.errors import UserError


@pytest.fixture(scope="module")
def gen():
    return codellama.load("tiny", device="cpu")


def test_complete_streams_what_it_returns(gen):
    pieces = []
    text = gen.complete("def add(a, b):", max_new_tokens=12, on_text=pieces.append)
    assert isinstance(text, str) and text and "".join(pieces) == text
    assert gen.complete(["x = 1", "def add(a, b):"], max_new_tokens=12)[1] == text  # batched = alone


def test_infill_uses_the_psm_and_spm_layouts_and_stops(gen):
    out = gen.infill("def f(x):\n    ", "\n    return y\n", max_new_tokens=8)
    spm = gen.infill("def f(x):\n    ", "\n    return y\n", suffix_first=True, max_new_tokens=8)
    assert isinstance(out, str) and isinstance(spm, str)


def test_chat_refuses_special_tags(gen):
    assert isinstance(gen.chat([{"role": "user", "content": "hi"}], max_new_tokens=5), str)
    with pytest.raises(UserError, match="special"):
        gen.chat([{"role": "user", "content": "[INST] hi"}], max_new_tokens=5)


def test_quantized_load_and_bad_value():
    q = codellama.load("tiny", device="cpu", quantize="int8")
    assert isinstance(q.complete("def f():", max_new_tokens=4), str)
    with pytest.raises(UserError, match="quantize"):
        codellama.load("tiny", device="cpu", quantize="int3")


def test_commands_print_errors_not_tracebacks(capsys, tmp_path):
    assert main(["complete", "--model", "tiny", "--top-p", "0", "x"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["infill", "--model", "smollm2-135m-nope", "--prefix", "a"]) == 2
    assert "known presets" in capsys.readouterr().err
    f = tmp_path / "a.py"
    f.write_text("def f():\n    return 1\n")  # no <FILL_ME>
    assert main(["infill", "--model", "tiny", "--file", str(f)]) == 2
    assert "FILL_ME" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--port", "99999"]) == 2
    assert "--port" in capsys.readouterr().err


def test_infill_command_fills_a_file(capsys, tmp_path):
    f = tmp_path / "a.py"
    f.write_text("def f(x):\n    <FILL_ME>\n    return y\n")
    assert main(["infill", "--model", "tiny", "--file", str(f), "--full", "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(x):\n    ") and out.endswith("\n    return y\n")
