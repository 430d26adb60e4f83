"""The examples run and report what they claim."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    "script,expect",
    [
        ("gpt2_demo.py", ["2 attention site(s): 2 rewritten, 0 kept", "causal"]),
        (
            "sigmoid_and_temperature.py",
            ["2 attention site(s): 2 rewritten, 0 kept", "sigmoid", "temperature"],
        ),
    ],
)
def test_example_runs(script, expect):
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for s in expect:
        assert s in r.stdout, r.stdout
    diff = float(r.stdout.split("max |attnfx - eager|")[1].split(":")[1].split()[0])
    assert diff < 1e-4, r.stdout
