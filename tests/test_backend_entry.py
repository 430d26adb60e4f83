"""The backend is reachable by name in a fresh interpreter, with no `import attnfx`."""

import subprocess
import sys
import textwrap


def test_backend_by_name_without_import():
    code = textwrap.dedent(
        """
        import torch
        class A(torch.nn.Module):
            def forward(self, q, k, v):
                return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
        q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
        out = torch.compile(A(), backend="attnfx")(q, k, v)
        import sys
        assert "attnfx" in sys.modules
        from attnfx import counters
        assert counters["rewritten.softmax"] == 1, counters
        ref = A()(q, k, v)
        assert (out - ref).abs().max() < 1e-5
        print("OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout
