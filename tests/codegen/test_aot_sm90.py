"""DESIGN §9: compile every generated kernel ahead of time for sm_90 (no GPU needed).

For a representative set of specs, with the real launch configs: no register spills
(stack / local memory bytes from ``cuobjdump --dump-resource-usage``), shared memory
within the 227 KB an sm_90 block may use, and tensor-core MMA (HGMMA/HMMA) in the
forward's SASS.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile

import pytest
import sympy
import triton

from attnfx.codegen import kernel_targets
from attnfx.predicate import K, MaskPredicate, Q
from attnfx.spec import AttentionSpec, ScoreOp

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CAUSAL = MaskPredicate(sympy.Le(K, Q)).to_key()
SMEM_LIMIT = 227 * 1024

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(BIN, "cuobjdump")), reason="triton's CUDA backend tools missing"
)


def _spec(d, dtype, kind):
    ops_ = [ScoreOp("mul", d**-0.5)]
    aux, act, group = (), "softmax", 1
    if kind == "causal":
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
    elif kind == "mask":
        ops_.append(ScoreOp("fill_aux", -math.inf, aux=0))
        aux = ("bool",)
    elif kind == "gqa":
        ops_.append(ScoreOp("fill_pred", -math.inf, pred=CAUSAL))
        group = 4
    elif kind == "sigmoid":
        act = "sigmoid"
        ops_.append(ScoreOp("add", -math.log(4096)))
    return AttentionSpec(
        activation=act,
        score_ops=tuple(ops_),
        aux_dtypes=aux,
        head_dim=d,
        head_dim_v=d,
        gqa_group=group,
        dtype=dtype,
        out_dtype=dtype,
    )


CASES = [(d, "float16", "causal") for d in (16, 40, 64, 80, 96, 128, 160, 192, 256)]
CASES += [(d, "bfloat16", "none") for d in (64, 128, 256)]
CASES += [(64, "float16", "mask"), (128, "bfloat16", "mask"), (128, "bfloat16", "gqa")]
CASES += [(64, "bfloat16", "sigmoid"), (128, "float16", "sigmoid")]


def _tool(name, cubin: bytes, *args) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([os.path.join(BIN, name), *args, f.name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def compile_sm90(target):
    from triton.backends.compiler import GPUTarget

    return triton.compile(
        target.source(),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": target.config.num_warps, "num_stages": target.config.num_stages},
    )


def resource_usage(cubin: bytes) -> dict[str, int]:
    out = _tool("cuobjdump", cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, out
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups()), strict=True))


@pytest.mark.parametrize("d,dtype,kind", CASES, ids=[f"{d}-{t}-{k}" for d, t, k in CASES])
def test_sm90_compiles_without_spills(d, dtype, kind):
    spec = _spec(d, dtype, kind)
    rows = []
    for t in kernel_targets(spec):
        assert type(t.fn).__name__ == "JITFunction"
        k = compile_sm90(t)
        use = resource_usage(k.asm["cubin"])
        rows.append((t.name, t.config, use, k.metadata.shared))
        assert use["stack"] == 0 and use["local"] == 0, f"{t.name} {t.config} spills: {use}"
        assert k.metadata.shared <= SMEM_LIMIT, f"{t.name} uses {k.metadata.shared} B shared"
        if t.name == "fwd":
            sass = _tool("cuobjdump", k.asm["cubin"], "-sass")
            assert re.search(r"\bHGMMA\b|\bHMMA\b", sass), "no tensor-core MMA in the forward"
    print(spec.describe(), *rows, sep="\n  ")
