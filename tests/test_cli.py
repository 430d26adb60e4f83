import json
import subprocess
import sys
import textwrap

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
