"""Static sm_90 analysis of the generated kernels, without a GPU.

Each kernel target (``kernel_targets``) is compiled ahead of time for sm_90 with Triton's
own toolchain (ptxas, cuobjdump ship in its CUDA backend), and read three ways:

* resources — registers, spills (stack / local bytes), shared memory;
* occupancy — CTAs per SM from those and the warp count (sm_90: 64K registers allocated
  per warp in 256-register units, 228 KB shared memory of which 1 KB is reserved per
  CTA, 64 warps, 32 CTAs);
* instruction mix of each loop — loops are the targets of backward branches; each loop
  body's instructions are counted by class (``CLASSES``): tensor-core MMAs (wgmma
  ``HGMMA`` with its shape, mma.sync ``HMMA``), special-function ops (``MUFU`` by
  function), FP32 arithmetic, 32- and 64-bit integer ops, async copies, barriers.

The loops that contain an MMA are a kernel's main loops; the one with the fewest
instructions is its unmasked loop (full tiles: no predicate, no bounds), the others are
the masked ones (diagonal / partial tiles, tails).  This is what ``benchmarks/sass_report.py``
prints and what ``tests/codegen/test_sass.py`` holds the default configs to.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import tempfile

# sm_90 limits used for occupancy
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_CTA = 1024
WARPS_PER_SM = 64
CTAS_PER_SM = 32


def tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def available() -> bool:
    """Whether Triton's CUDA backend tools (``cuobjdump``) are installed."""
    return os.path.exists(os.path.join(tools_dir(), "cuobjdump"))


def _tool(name: str, cubin: bytes, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run(
            [os.path.join(tools_dir(), name), *args, f.name], capture_output=True, text=True
        )
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed: {r.stderr.strip()[:500]}")
    return r.stdout


def compile_sm90(target, maxnreg: int | None = None):
    """``triton.compile`` of a ``KernelTarget`` for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    opts = target.config.launch_kwargs(False)  # what the launcher's JIT compiles with
    if maxnreg is not None:
        opts["maxnreg"] = maxnreg
    return triton.compile(target.source(), target=GPUTarget("cuda", 90, 32), options=opts)


def disassemble(cubin: bytes) -> str:
    """The cubin's SASS listing (``cuobjdump -sass``)."""
    return _tool("cuobjdump", cubin, "-sass")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local bytes (spills), static shared memory of a cubin."""
    out = _tool("cuobjdump", cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage in: {out[:300]}")
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups()), strict=True))


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per sm_90 SM for a kernel of ``regs`` registers per thread, ``smem``
    bytes of shared memory per CTA and ``num_warps`` warps."""
    per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // max(1, per_warp * num_warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA) if smem else CTAS_PER_SM
    by_warps = WARPS_PER_SM // num_warps
    return max(0, min(by_regs, by_smem, by_warps, CTAS_PER_SM))


# ---------------------------------------------------------------------------------------
# SASS parsing
# ---------------------------------------------------------------------------------------

# "/*0a70*/   @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;"
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. "HGMMA.64x64x16.F32.BF16"
    args: str


def parse(sass: str) -> list[Instr]:
    """The instructions of a ``cuobjdump -sass`` listing (one kernel), in address order."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m:
            out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last address) of each loop: a branch back to an earlier address."""
    found = set()
    for ins in instrs:
        if ins.op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", ins.args)
            if m and int(m.group(1), 16) < ins.addr:
                found.add((int(m.group(1), 16), ins.addr))
    return sorted(found)


_INT = {"IADD3", "IMAD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IABS", "SGXT", "PRMT"}
_INT |= {"IMNMX", "VIADD", "VIMNMX", "IMUL", "ISCADD", "FLO", "POPC", "BMSK", "IADD"}
_INT64 = ("IADD3.X", "LEA.HI.X", "IMAD.X", "IMAD.WIDE", "ISETP.EX")


def _base(op: str) -> str:
    return op.split(".")[0]


def _is_int64(op: str) -> bool:
    return op.startswith(("IMAD.WIDE", "LEA.HI.X")) or any(
        p in ("X", "EX") for p in op.split(".")[1:] if _base(op) in ("IADD3", "IMAD", "ISETP")
    )


# One row per instruction class: (name, predicate on the opcode).  The first match counts.
CLASSES: tuple[tuple[str, object], ...] = (
    ("HGMMA", lambda o: o.startswith("HGMMA")),
    ("HMMA", lambda o: o.startswith("HMMA")),
    ("MUFU.EX2", lambda o: o.startswith("MUFU.EX2")),
    ("MUFU.TANH", lambda o: o.startswith("MUFU.TANH")),
    ("MUFU.RCP", lambda o: o.startswith("MUFU.RCP")),
    ("MUFU other", lambda o: o.startswith("MUFU")),
    ("FMUL", lambda o: _base(o) == "FMUL"),
    ("FFMA", lambda o: _base(o) == "FFMA"),
    ("FADD", lambda o: _base(o) == "FADD"),
    ("FMNMX", lambda o: _base(o) == "FMNMX"),
    ("FSEL/FSETP", lambda o: _base(o) in ("FSEL", "FSETP")),
    ("F2FP/F2F", lambda o: _base(o) in ("F2FP", "F2F", "F2I", "I2F", "I2FP")),
    ("SHFL", lambda o: _base(o) == "SHFL"),
    ("async copy", lambda o: _base(o) in ("LDGSTS", "LDGDEPBAR", "UTMALDG", "UBLKCP")),
    ("LDG", lambda o: _base(o) == "LDG"),
    ("LDS/LDSM", lambda o: _base(o) in ("LDS", "LDSM")),
    ("STS/STG", lambda o: _base(o) in ("STS", "STG", "STSM")),
    ("spill (LDL/STL)", lambda o: _base(o) in ("LDL", "STL")),
    ("barrier", lambda o: _base(o) in ("BAR", "SYNCS", "DEPBAR", "WARPSYNC", "MEMBAR")),
    ("warpgroup", lambda o: _base(o) == "WARPGROUP"),
    ("int64", _is_int64),
    ("int", lambda o: _base(o) in _INT),
    ("uniform", lambda o: o.startswith("U")),
    ("move", lambda o: _base(o) in ("MOV", "S2R", "S2UR", "R2UR", "CS2R")),
    ("branch", lambda o: _base(o) in ("BRA", "EXIT", "BSSY", "BSYNC", "RET", "CALL")),
    ("other", lambda o: True),
)
CLASS_NAMES = tuple(name for name, _ in CLASSES)


def classify(op: str) -> str:
    for name, pred in CLASSES:
        if pred(op):
            return name
    return "other"  # pragma: no cover - the last class matches everything


@dataclasses.dataclass
class LoopMix:
    """Instruction mix of one loop body (per thread, per iteration)."""

    start: int
    end: int
    total: int  # instructions, NOPs excluded
    counts: dict[str, int]  # by class
    mma_shapes: dict[str, int]  # "HGMMA.64x64x16" (and "HMMA.16816") -> count

    @property
    def mma(self) -> int:
        return self.counts.get("HGMMA", 0) + self.counts.get("HMMA", 0)


def loop_mixes(instrs: list[Instr]) -> list[LoopMix]:
    """The mix of every loop (address order)."""
    out = []
    for lo, hi in loops(instrs):
        body = [i for i in instrs if lo <= i.addr <= hi and i.op != "NOP"]
        counts = collections.Counter(classify(i.op) for i in body)
        shapes = collections.Counter(
            ".".join(i.op.split(".")[:2]) for i in body if i.op.startswith(("HGMMA", "HMMA"))
        )
        out.append(LoopMix(lo, hi, len(body), dict(counts), dict(shapes)))
    return out


def main_loops(mixes: list[LoopMix]) -> tuple[LoopMix | None, list[LoopMix]]:
    """(unmasked loop, masked loops): the loops with an MMA; the leanest is the unmasked
    one (full tiles), the others evaluate predicates or bounds."""
    mma = [m for m in mixes if m.mma]
    if not mma:
        return None, []
    lean = min(mma, key=lambda m: m.total)
    return lean, [m for m in mma if m is not lean]


# ---------------------------------------------------------------------------------------
# One kernel
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class KernelReport:
    """What one compiled kernel target looks like on sm_90."""

    kernel: str  # "fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"
    index: int  # candidate index (0: the default config)
    config: str
    num_warps: int
    reg: int = 0
    spill: int = 0  # stack + local bytes
    smem: int = 0
    ctas: int = 0  # CTAs per SM
    unmasked: LoopMix | None = None
    masked: list[LoopMix] = dataclasses.field(default_factory=list)
    mma_outside_loops: int = 0  # MMAs in the whole kernel but in no loop
    mma_kinds: tuple[str, ...] = ()  # "HGMMA", "HMMA" found anywhere in the kernel
    error: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def analyze(target, maxnreg: int | None = None) -> KernelReport:
    """Compile ``target`` for sm_90 and read its resources, occupancy and loops."""
    cfg = target.config
    rep = KernelReport(target.name, target.index, cfg.describe(), cfg.num_warps)
    try:
        k = compile_sm90(target, maxnreg)
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a finding
        rep.error = f"{type(e).__name__}: {e}"[:2000]
        return rep
    cubin = k.asm["cubin"]
    use = resource_usage(cubin)
    rep.reg, rep.spill = use["reg"], use["stack"] + use["local"]
    rep.smem = k.metadata.shared
    rep.ctas = ctas_per_sm(rep.reg, rep.smem, cfg.num_warps)
    instrs = parse(disassemble(cubin))
    mixes = loop_mixes(instrs)
    rep.unmasked, rep.masked = main_loops(mixes)
    kinds = {i.op.split(".")[0] for i in instrs if i.op.startswith(("HGMMA", "HMMA"))}
    rep.mma_kinds = tuple(sorted(kinds))
    spans = [(m.start, m.end) for m in mixes]
    rep.mma_outside_loops = sum(
        1
        for i in instrs
        if i.op.startswith(("HGMMA", "HMMA")) and not any(lo <= i.addr <= hi for lo, hi in spans)
    )
    return rep


# ---------------------------------------------------------------------------------------
# The softmax forward's arithmetic bound
# ---------------------------------------------------------------------------------------

# Classes that scale with the tile: what the bound below counts.
ARITHMETIC = ("HGMMA", "HMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "SHFL", "F2FP/F2F")


def arithmetic(mix: LoopMix) -> int:
    """The loop's tile arithmetic: MMAs, EX2, FP32 ops, shuffles, conversions."""
    return sum(mix.counts.get(c, 0) for c in ARITHMETIC)


def softmax_forward_bound(block_m: int, block_n: int, num_warps: int, d: int, dv: int) -> dict:
    """Per thread and key tile, the arithmetic an online-softmax forward cannot avoid on
    sm_90 wgmma (bf16/fp16 operands, fp32 accumulators), counted by hand:

    * T = 32·warps threads; each holds E = BLOCK_M·BLOCK_N/T scores, E_acc =
      BLOCK_M·Dv/T accumulator elements, in R = BLOCK_M/(8·warps) rows (a warp's
      m16 slab: 2 rows per thread);
    * HGMMA: per warpgroup, D/16 k-steps for Q·Kᵀ and BLOCK_N/16 for P·V, times the
      m64 slabs each warpgroup owns (BLOCK_M / (64 · warps/4));
    * per score: one FMNMX (row max), one FFMA (s·c − m·c, the scale folded in), one EX2,
      one FADD (row sum), half an F2FP (P packed in pairs for the second MMA);
    * per row: 2 SHFL + 2 FMNMX (max across the quad), 2 SHFL + 2 FADD (sum across the
      quad), one FMUL (m·c), one EX2 (α = exp2(m_old − m_new)), one FFMA (l·α + sum);
    * per accumulator element: one FMUL (acc·α).

    A plain Triton flash-attention forward (the tutorial's algorithm, scale applied to the
    row max) compiled the same way (128x64, 8 warps, D64) has exactly this: 8 HGMMA,
    34 EX2, 34 FFMA, 34 FMUL, 36 FADD, 36 FMNMX, 8 SHFL, 16 F2FP = 206.  Loop control, address arithmetic, async copies and barriers are not
    counted (they do not scale with the tile and are reported separately)."""
    t = 32 * num_warps
    e, e_acc, r = block_m * block_n // t, block_m * dv // t, max(1, block_m // (8 * num_warps))
    slabs = max(1, block_m // (64 * max(1, num_warps // 4)))
    counts = {
        "HGMMA": slabs * (d // 16 + block_n // 16),
        "MUFU.EX2": e + r,
        "FFMA": e + r,
        "FMUL": e_acc + r,
        "FADD": e + 2 * r,
        "FMNMX": e + 2 * r,
        "SHFL": 4 * r,
        "F2FP/F2F": e // 2,
    }
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------------------
# Specs the report and its tests look at
# ---------------------------------------------------------------------------------------

REPORT_KINDS = ("softmax", "causal", "sigmoid", "temperature", "softcap", "relbias")


def sample_spec(kind: str, d: int, dtype: str = "bfloat16"):
    """A representative spec per kind: softmax (scale only), causal, sigmoid (FlashSigmoid
    bias −log 4096), temperature (a per-query multiplier), softcap (Gemma-2's 30·tanh(s/30),
    causal), relbias (a relative position bias table, ``add_table_aux``)."""
    import math

    import sympy

    from attnfx.predicate import K, MaskPredicate, Q
    from attnfx.spec import AttentionSpec, ScoreOp

    causal = ScoreOp("fill_pred", -math.inf, pred=MaskPredicate(sympy.Le(K, Q)).to_key())
    ops, act, aux, bcast = [ScoreOp("mul", d**-0.5)], "softmax", (), ()
    if kind == "causal":
        ops.append(causal)
    elif kind == "sigmoid":
        act = "sigmoid"
        ops.append(ScoreOp("add", -math.log(4096)))
    elif kind == "temperature":
        ops.append(ScoreOp("mul_aux", aux=0))
        aux = ("float32",)
        bcast = ("row",)  # one temperature per query row, as the launcher reads it
    elif kind == "softcap":
        ops += [ScoreOp("mul", 1 / 30), ScoreOp("tanh"), ScoreOp("mul", 30.0), causal]
    elif kind == "relbias":  # a relative position bias table read at clamp(K - Q) + 64
        idx = sympy.Min(128, sympy.Max(0, K - Q + 64))
        ops.append(ScoreOp("add_table_aux", aux=0, expr=sympy.srepr(idx)))
        aux, bcast = ("float32",), ("col",)  # (B, H, 1, T): as the launcher reads it
    elif kind != "softmax":
        raise ValueError(f"unknown kind {kind!r}; known: {REPORT_KINDS}")
    return AttentionSpec(
        activation=act,
        score_ops=tuple(ops),
        aux_dtypes=aux,
        aux_bcast=bcast,
        head_dim=d,
        head_dim_v=d,
        dtype=dtype,
        out_dtype=dtype,
    )
