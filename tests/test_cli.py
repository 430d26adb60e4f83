import json
import subprocess
import sys
import textwrap

import pytest

from attnfx.cli import main

SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn as nn

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v

    model = Attn()
    example_inputs = tuple(torch.randn(1, 2, 8, 16) for _ in range(3))
    """
)


def test_explain_file_prints_report(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(SCRIPT)
    assert main(["explain", str(f)]) == 0
    out = capsys.readouterr().out
    assert "softmax" in out and "rewritten" in out
    assert "1 attention site(s): 1 rewritten, 0 kept" in out


def test_explain_json(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(SCRIPT)
    assert main(["explain", "--json", str(f)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rewritten"] == 1
    assert d["sites"][0]["spec"]["scale"] == 0.25


def test_explain_missing_names(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    assert main(["explain", str(f)]) == 2
    assert "must define" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(SCRIPT)
    r = subprocess.run(
        [sys.executable, "-m", "attnfx.cli", "explain", str(f)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "rewritten" in r.stdout


def _one_line_error(capsys, argv, *words):
    """``argv`` exits with status 2 and one line on stderr naming ``words``."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_explain_missing_file(tmp_path, capsys):
    _one_line_error(capsys, ["explain", str(tmp_path / "nope.py")], "nope.py", "no such file")


def test_explain_directory(tmp_path, capsys):
    _one_line_error(capsys, ["explain", str(tmp_path)], str(tmp_path), "directory")


@pytest.mark.parametrize("n", ["-3", "0", "abc"])
def test_fuzz_bad_example_count(capsys, n):
    _one_line_error(capsys, ["fuzz", "--examples", n, "--quiet"], "--examples", n)


def test_fuzz_unknown_kind(capsys):
    line = _one_line_error(capsys, ["fuzz", "--kind", "softmax,nosuch", "--quiet"], "nosuch")
    assert "softmax" in line and "sigmoid" in line  # the known kinds


def test_fuzz_cuda_without_cuda(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["fuzz", "--device", "cuda", "--examples", "1", "--quiet"], "CUDA")


def test_version(capsys):
    import attnfx

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnfx {attnfx.__version__}"


@pytest.mark.parametrize(
    "argv", [["explain", "/nonexistent/m.py"], ["fuzz", "--examples", "-3"], ["--version"]]
)
def test_console_errors_without_traceback(argv):
    r = subprocess.run(
        [sys.executable, "-m", "attnfx.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == (0 if argv == ["--version"] else 2), r.stderr
    assert len(r.stderr.strip().splitlines()) == (0 if argv == ["--version"] else 1), r.stderr
