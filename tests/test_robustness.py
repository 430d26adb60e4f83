"""The surface under misuse and load: options, mode, on_mismatch="raise", explain beside
other compiled models, the counters, threads, and what ``import attnfx`` gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import attnfx
from attnfx.backend import attnfx_backend
from attnfx.passes import verify

ROOT = Path(__file__).resolve().parents[1]


class Softmax(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


class Sigmoid(nn.Module):
    def forward(self, q, k, v):
        return torch.sigmoid(q @ k.transpose(-2, -1) * 0.25 - 2.0) @ v


def _qkv(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, d, generator=g) for _ in range(3))


# ---------------------------------------------------------------------------------------
# random_trials


@pytest.mark.parametrize("bad", ["3", 1.5, None, -1, True, [1]])
def test_random_trials_is_validated(bad):
    with pytest.raises(ValueError, match="random_trials"):
        attnfx.Options.from_dict({"random_trials": bad})
    cm = torch.compile(Softmax(), backend="attnfx", options={"random_trials": bad})
    with pytest.raises(Exception, match="random_trials") as info:
        cm(*_qkv())
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


@pytest.mark.parametrize("ok", [0, 2])
def test_random_trials_accepts_counts(ok):
    assert attnfx.Options.from_dict({"random_trials": ok}).random_trials == ok
    m = Softmax()
    out = torch.compile(m, backend="attnfx", options={"random_trials": ok, "verify": "always"})(
        *_qkv()
    )
    torch.testing.assert_close(out, m(*_qkv()))
    assert attnfx.counters["rewritten.softmax"] == 1


# ---------------------------------------------------------------------------------------
# mode=


@pytest.fixture
def inductor_patches(monkeypatch):
    """The config_patches of each outermost inductor compile (compile_fx applies them,
    then calls itself without)."""
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx

    depth = []

    def recording(gm, example_inputs, *a, **kw):
        if not depth:
            # the op-contract pass attnfx always adds (backend.op_contract), apart
            patches = dict(kw.get("config_patches") or {})
            contract = patches.pop("post_grad_custom_post_pass", None)
            assert contract is not None and "attnfx-op-contract" in str(contract.uuid())
            seen.append(patches or None)
        depth.append(1)
        try:
            return real(gm, example_inputs, *a, **kw)
        finally:
            depth.pop()

    monkeypatch.setattr(cfx, "compile_fx", recording)
    return seen


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_mode_is_forwarded_to_inductor(inductor_patches, mode):
    from torch._inductor import list_mode_options

    m = Softmax()
    out = torch.compile(m, backend="attnfx", mode=mode)(*_qkv())
    torch.testing.assert_close(out, m(*_qkv()))
    assert attnfx.counters["rewritten.softmax"] == 1
    assert inductor_patches == [list_mode_options(mode)]


def test_mode_as_an_option(inductor_patches):
    # torch.compile refuses mode= together with options=: the option is how to have both
    opts = {"mode": "reduce-overhead", "verify": "always"}
    torch.compile(Softmax(), backend="attnfx", options=opts)(*_qkv())
    assert inductor_patches == [{"triton.cudagraphs": True}]


def test_default_mode_changes_nothing(inductor_patches):
    torch.compile(Softmax(), backend="attnfx", mode="default")(*_qkv())
    assert inductor_patches == [None]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mode": "bogus"}, ["bogus", "max-autotune"]),
        ({"options": {"mode": "bogus"}}, ["bogus", "max-autotune"]),
        ({"options": {"mode": "max-autotune", "inner": "eager"}}, ["max-autotune", "inner"]),
    ],
)
def test_bad_mode_is_refused(kwargs, words):
    cm = torch.compile(Softmax(), backend="attnfx", **kwargs)
    with pytest.raises(Exception) as info:
        cm(*_qkv())
    err = getattr(info.value, "inner_exception", info.value)
    assert isinstance(err, ValueError), repr(info.value)
    assert all(w in str(err) for w in words), str(err)


# ---------------------------------------------------------------------------------------
# on_mismatch="raise"


def test_verification_error_is_caught_as_the_readme_shows(monkeypatch):
    monkeypatch.setattr(
        verify, "verify_site", lambda *a, **kw: verify.Verdict(False, message="planted mismatch")
    )
    model = Softmax()
    x = _qkv()
    # README: options={"on_mismatch": "raise"} raises attnfx.VerificationError
    model = torch.compile(model, backend="attnfx", options={"on_mismatch": "raise"})
    try:
        model(*x)
    except attnfx.VerificationError as e:
        assert "verifier rejected the rewrite" in str(e) and "planted mismatch" in str(e)
    else:
        pytest.fail("no VerificationError")
    assert attnfx.counters["rewritten.softmax"] == 0


# ---------------------------------------------------------------------------------------
# explain beside other compiled models; the counters


def _counting(n):
    def backend(gm, example_inputs):
        n.append(1)
        return attnfx_backend(gm, example_inputs)

    return backend


def test_explain_leaves_other_compiled_models_alone():
    compiles = []
    a = Softmax()
    ca = torch.compile(a, backend=_counting(compiles))
    ca(*_qkv())
    assert len(compiles) == 1
    rep = attnfx.explain(Sigmoid(), *_qkv())  # another model
    assert rep.count("sigmoid") == 1, str(rep)
    rep = attnfx.explain(a, *_qkv())  # the very same module
    assert rep.count("softmax") == 1, str(rep)
    rep = attnfx.explain(ca, *_qkv())  # its compiled wrapper
    assert rep.count("softmax") == 1, str(rep)
    ca(*_qkv())
    assert len(compiles) == 1  # no recompile: its compiled code was left alone


def test_explain_many_times_reports_every_time():
    m = Softmax()
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        rep = attnfx.explain(m, *_qkv())
        assert rep.count("softmax") == 1, str(rep)


def test_counters_say_what_runs():
    m = Softmax()
    torch.compile(m, backend="attnfx")(*_qkv())
    attnfx.explain(m, *_qkv())
    assert attnfx.counters["rewritten.softmax"] == 1, dict(attnfx.counters)
    attnfx.explain(Sigmoid(), *_qkv())
    assert "rewritten.sigmoid" not in attnfx.counters, dict(attnfx.counters)


# ---------------------------------------------------------------------------------------
# threads


def _in_threads(fns):
    errors, results = [], [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i):
        try:
            barrier.wait()
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_explain_reports_are_per_call():
    for _ in range(3):
        soft, sig = _in_threads(
            [
                lambda: attnfx.explain(Softmax(), *_qkv()),
                lambda: attnfx.explain(Sigmoid(), *_qkv()),
            ]
        )
        assert [s.kind for s in soft.sites] == ["softmax"], str(soft)
        assert [s.kind for s in sig.sites] == ["sigmoid"], str(sig)


def test_interpreter_kernels_from_two_threads(monkeypatch):
    from attnfx import ops
    from attnfx.spec import AttentionSpec, ScoreOp

    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    spec = AttentionSpec(
        activation="softmax",
        score_ops=(ScoreOp("mul", 0.25),),
        aux_dtypes=(),
        head_dim=16,
        head_dim_v=16,
        gqa_group=1,
        dtype="float32",
        out_dtype="float32",
    )

    def work(seed):
        def run():
            outs = []
            for i in range(3):
                q, k, v = (t.requires_grad_() for t in _qkv(n=16, seed=seed + i))
                out = ops.attention(q, k, v, spec)
                out.sum().backward()
                outs.append((out.detach(), q.grad))
            return outs

        return run

    got = _in_threads([work(0), work(10)])
    for seed, outs in zip((0, 10), got):
        for i, (out, dq) in enumerate(outs):
            q, k, v = (t.requires_grad_() for t in _qkv(n=16, seed=seed + i))
            ref = torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v
            ref.sum().backward()
            torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dq, q.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# install and import


def test_documented_names_after_a_plain_import():
    code = textwrap.dedent(
        """
        import attnfx
        assert attnfx.nn.SigmoidAttention and attnfx.nn.SelectiveAttention
        assert attnfx.testing.assert_attention_close
        assert attnfx.ops.attention and attnfx.explain and attnfx.counters is not None
        print("OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_hypothesis_is_a_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("hypothesis") for d in meta["dependencies"])


def test_explain_leaves_no_shape_history(monkeypatch):
    """An explain on one shape does not make the next compile of the same code dynamic
    (automatic dynamic shapes), nor does an earlier compile make explain's dynamic."""
    import attnfx.backend as B

    m = Softmax()
    dims = []

    def shapes(example_inputs):
        """ "static" when every input is a tensor of concrete sizes (no SymInt)."""
        for t in example_inputs:
            if not isinstance(t, torch.Tensor) or any(isinstance(d, torch.SymInt) for d in t.shape):
                return "dynamic"
        return "static"

    def backend(gm, example_inputs):
        dims.append(shapes(example_inputs))
        return gm.forward

    attnfx.explain(m, *_qkv(n=8))
    torch.compile(m, backend=backend)(*_qkv(n=12))
    assert dims == ["static"], dims

    real = B.attnfx_backend

    def recording(gm, example_inputs, **kw):
        dims.append(shapes(example_inputs))
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(B, "attnfx_backend", recording)
    rep = attnfx.explain(m, *_qkv(n=12))
    assert rep.count("softmax") == 1, str(rep)
    assert dims[1:] == ["static"], dims


def test_collecting_is_per_thread():
    """Records of compiles in two threads at once go to each thread's own block."""
    from attnfx import report

    def run(cls):
        def go():
            with report.collecting() as records:
                torch.compile(cls(), backend="attnfx")(*_qkv())
            return [r.kind for r in records]

        return go

    for _ in range(3):
        torch._dynamo.reset()
        soft, sig = _in_threads([run(Softmax), run(Sigmoid)])
        assert soft == ["softmax"] and sig == ["sigmoid"], (soft, sig)
