"""CPU benchmark: eager, inductor, attnfx (and F.scaled_dot_product_attention for single
sites) on real models and on single attention sites, steady-state time and peak memory,
forward and forward+backward, with the attnfx / inductor ratios side by side.

"attnfx" is what users get (cpu="auto"); "attnfx-op" forces every verified site onto the
op's CPU path (cpu="always").  Each (workload, provider) runs in its own subprocess,
``--rounds`` times with the providers interleaved (the best round counts): compile and
warm up, then reset the peak RSS (``/proc/self/clear_refs``, Linux) after ``malloc_trim``,
time ``--repeat`` calls (median), and read the peak RSS over the pre-call baseline (``VmHWM − VmRSS``):
the memory the steady-state calls take, without what compiling took. Forward runs
under ``torch.no_grad`` (inference); forward+backward with gradients of every parameter
(models) or of q, k, v (sites).

    PYTHONPATH=. python benchmarks/bench_cpu.py                   # everything (~90 min, 2 cores)
    PYTHONPATH=. python benchmarks/bench_cpu.py --quick           # smoke test (< 3 min)
    PYTHONPATH=. python benchmarks/bench_cpu.py --only gpt2,sigmoid --n 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

# "attnfx" is what users get (option cpu="auto": sites whose op path inductor beats on
# CPU stay with inductor); "attnfx-op" forces every verified site onto the op's CPU path
# (cpu="always"), to show what that path costs.
PROVIDERS = ("eager", "inductor", "attnfx", "attnfx-op", "sdpa")
MODES = ("fwd", "fwdbwd")
SITES = ("softmax", "causal", "sigmoid", "temperature", "softcap")
MODELS = (
    "gpt2-eager",
    "gpt2-sdpa",
    "bert-eager",
    "bert-sdpa",
    "llama-eager",
    "llama-sdpa",
    "vit",
    "vit-eager",
)


# ---------------------------------------------------------------------------------------
# Workloads (built inside the worker)
# ---------------------------------------------------------------------------------------


def _site_fn(kind: str, provider: str):
    import torch
    import torch.nn.functional as F

    def eager(q, k, v, tau):
        n, d = q.shape[-2], q.shape[-1]
        s = q @ k.transpose(-2, -1) * d**-0.5
        if kind == "causal":
            keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        elif kind == "temperature":
            s = s * tau[..., None]  # a per-query temperature (Selective Attention)
        elif kind == "softcap":
            s = 30.0 * torch.tanh(s / 30.0)  # Gemma-2 soft-capping
        if kind == "sigmoid":
            return torch.sigmoid(s - math.log(n)) @ v  # FlashSigmoid's bias -log n
        return torch.softmax(s, dim=-1) @ v

    def sdpa(q, k, v, tau):
        if kind == "temperature":
            q = q * tau[..., None]
        return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")

    if provider == "sdpa":
        if kind in ("sigmoid", "softcap"):
            return None  # not expressible
        return sdpa
    return eager


def _site(kind: str, n: int, bh: tuple[int, int], d: int, provider: str, grad: bool):
    import torch

    fn = _site_fn(kind, provider)
    if fn is None:
        return None
    g = torch.Generator().manual_seed(0)
    b, h = bh
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    tau = torch.rand(b, h, n, generator=g) + 0.5
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return fn, (q, k, v, tau), [q, k, v]


def _model(name: str, n: int):
    import torch

    base, _, impl = name.partition("-")
    if base == "vit":
        import timm

        if impl == "eager":
            timm.layers.set_fused_attn(False)
        # ViT-Tiny proportions (192 wide, 3 heads), 6 layers; 384 px: N = 577 tokens
        m = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=384, num_classes=10, depth=6
        )
        return m, (torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(0)),)
    import transformers

    impl = impl or "eager"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, n), generator=g)
    if base == "gpt2":
        c = transformers.GPT2Config(
            n_layer=4, n_head=4, n_embd=256, n_positions=n, vocab_size=1000,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
        )  # fmt: skip
        cls = transformers.GPT2Model
        args = (ids,)
    elif base == "bert":
        c = transformers.BertConfig(
            num_hidden_layers=4, num_attention_heads=4, hidden_size=256,
            intermediate_size=1024, vocab_size=1000, max_position_embeddings=n,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        cls = transformers.BertModel
        ids = torch.randint(0, 1000, (2, n), generator=g)
        am = torch.ones(2, n, dtype=torch.long)
        am[1, (3 * n) // 4 :] = 0  # padding in the second sequence
        args = (ids, am)
    elif base == "llama":
        c = transformers.LlamaConfig(
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            hidden_size=256, intermediate_size=688, vocab_size=1000,
            max_position_embeddings=n,
        )  # fmt: skip
        cls = transformers.LlamaModel
        args = (ids,)
    else:
        raise ValueError(name)
    c._attn_implementation = impl
    return cls(c), args


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


# ---------------------------------------------------------------------------------------
# Worker: one (workload, provider), both modes
# ---------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: a cleaner baseline
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def _worker(spec: dict) -> dict:
    import torch

    from attnfx._compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # transformers and timm import it
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    torch.manual_seed(0)
    provider, work, n = spec["provider"], spec["work"], spec["n"]
    res = {}
    for mode in spec["modes"]:
        grad = mode == "fwdbwd"
        if work in SITES:
            built = _site(work, n, tuple(spec["bh"]), spec["d"], provider, grad)
            if built is None:
                res[mode] = {"status": "n/a", "reason": "not expressible with SDPA"}
                continue
            fn, args, leaves = built
        else:
            if provider == "sdpa":
                res[mode] = {"status": "n/a", "reason": "single sites only"}
                continue
            model, args = _model(work, n)
            model.train(grad)
            model.requires_grad_(grad)
            fn, leaves = model, list(model.parameters()) if grad else []
        if provider in ("inductor", "attnfx", "attnfx-op"):
            import attnfx

            attnfx.reset_counters()
            torch._dynamo.reset()
            if provider == "inductor":
                fn = torch.compile(fn, backend="inductor")
            else:
                cpu = "always" if provider == "attnfx-op" else "auto"
                fn = torch.compile(fn, backend="attnfx", options={"cpu": cpu})

        def call(fn=fn, args=args, leaves=leaves, grad=grad):
            if grad:
                for t in leaves:
                    t.grad = None
                _first_tensor(fn(*args)).float().sum().backward()
            else:
                with torch.no_grad():
                    fn(*args)

        t0 = time.perf_counter()
        try:
            call()
        except Exception as e:  # a provider that cannot run this workload
            res[mode] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}
            continue
        first_s = time.perf_counter() - t0
        for _ in range(spec["warmup"]):
            call()
        can_reset = _reset_peak()
        base_kb = _status_kb("VmRSS")
        times = []
        for _ in range(spec["repeat"]):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        peak_kb = _status_kb("VmHWM")
        times.sort()
        row = {
            "status": "ok",
            "ms": 1e3 * times[len(times) // 2],
            "ms_min": 1e3 * times[0],
            "ms_max": 1e3 * times[-1],
            "first_call_s": first_s,
            "peak_mib": (peak_kb - base_kb) / 1024 if can_reset else None,
            "rss_peak_mib": peak_kb / 1024,
        }
        if provider.startswith("attnfx"):
            import attnfx

            row["counters"] = {k: v for k, v in attnfx.counters.items() if v}
        res[mode] = row
    return res


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def _run_one(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {m: {"status": "timeout", "reason": f"> {timeout:.0f} s"} for m in spec["modes"]}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {m: {"status": "error", "reason": " | ".join(tail)[:300]} for m in spec["modes"]}


def _workloads(args) -> list[tuple[str, int]]:
    only = set(args.only.split(",")) if args.only else None
    out = []
    for m in MODELS if not args.no_models else ():
        if only and m not in only and m.split("-")[0] not in only:
            continue
        n = 577 if m.startswith("vit") else (args.model_n or (512 if args.quick else 1024))
        out.append((m, n))
    for s in SITES if not args.no_sites else ():
        if only and s not in only:
            continue
        for n in args.n:
            out.append((s, n))
    return out


def _fmt_ms(r):
    return f"{r['ms']:.1f}" if r and r.get("status") == "ok" else (r or {}).get("status", "-")


def _fmt_mem(r):
    if r and r.get("status") == "ok" and r.get("peak_mib") is not None:
        return f"{r['peak_mib']:.0f}"
    return "-"


def _ratio(a, b, key):
    if not (a and b and a.get("status") == "ok" and b.get("status") == "ok"):
        return None
    x, y = a.get(key), b.get(key)
    if x is None or y is None or y <= 0:
        return None
    return x / y


def _rewrites(row) -> str:
    cn = (row or {}).get("counters") or {}
    return " ".join(
        f"{k.split('.', 1)[1]}={v}" for k, v in cn.items() if k.startswith(("rewritten.", "kept."))
    )


def table(results: list[dict]) -> str:
    head = (
        f"{'workload':<14}{'N':>5} {'mode':<7}|"
        + "".join(f"{p:>10}" for p in PROVIDERS)
        + f" | {'speed x':>7}{'op x':>6} | {'mem MiB e/i/a/o/s':>21} | {'mem x':>6}| attnfx"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        for mode in MODES:
            c = {p: r["providers"].get(p, {}).get(mode) for p in PROVIDERS}
            if all(v is None for v in c.values()):
                continue
            sp = _ratio(c["inductor"], c["attnfx"], "ms")  # >1: attnfx faster
            op = _ratio(c["inductor"], c["attnfx-op"], "ms")
            mem = _ratio(c["attnfx"], c["inductor"], "peak_mib")
            if mem is None and c["attnfx"] and c["inductor"]:
                a, i = c["attnfx"].get("peak_mib"), c["inductor"].get("peak_mib")
                mem = 1.0 if (a is not None and i is not None and abs(a - i) < 1) else None
            mems = "/".join(_fmt_mem(c[p]) for p in PROVIDERS)
            lines.append(
                f"{r['work']:<14}{r['n']:>5} {mode:<7}|"
                + "".join(f"{_fmt_ms(c[p]):>10}" for p in PROVIDERS)
                + f" | {(f'{sp:.2f}' if sp else '-'):>7}{(f'{op:.2f}' if op else '-'):>6} | "
                + f"{mems:>21} | {(f'{mem:.2f}' if mem else '-'):>6}| {_rewrites(c['attnfx'])}"
                + (" (every site kept: inductor's graph)" if _kept_whole(c["attnfx"]) else "")
            )
    lines.append(
        "ms: best round's median steady-state time (rounds interleave the providers); "
        "speed x = inductor ms / attnfx ms (>= 1: attnfx at least as fast); op x = the same "
        "with every site forced onto the op's CPU path (attnfx-op, cpu='always'); mem: peak "
        "RSS over the pre-call baseline during the timed calls, lowest of the rounds; "
        "mem x = attnfx / inductor"
    )
    return "\n".join(lines)


def _best(rounds: list[dict], modes) -> dict:
    """Per mode, the round with the lowest median (noise on a shared machine only ever
    adds time), with every round's median kept; its memory the lowest peak of any round
    (likewise: allocator arenas and pages a round happened to touch only ever add, and
    the same graph measured 0.63-1.62x of itself across single rounds)."""
    out = {}
    for m in modes:
        ok = [r[m] for r in rounds if r.get(m, {}).get("status") == "ok"]
        if not ok:
            out[m] = rounds[-1].get(m, {"status": "error", "reason": "no result"})
            continue
        best = dict(min(ok, key=lambda x: x["ms"]))
        best["rounds_ms"] = [x["ms"] for x in ok]
        peaks = [x["peak_mib"] for x in ok if x.get("peak_mib") is not None]
        if peaks:
            best["peak_mib"] = min(peaks)
            best["rounds_peak_mib"] = peaks
        out[m] = best
    return out


def _kept_whole(row) -> bool:
    """Whether attnfx kept every site of the run (no rewrite): its compiled graph is then
    inductor's own (the causal site's forward+backward, interleaved in one process:
    18.40 ms against inductor's 18.37), and a ratio away from 1 is the processes' state,
    not the graph (across processes the same graph measured 0.92-1.03x)."""
    cn = (row or {}).get("counters") or {}
    return any(k.startswith("kept.") for k in cn) and not any(
        k.startswith("rewritten.") for k in cn
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes, few calls")
    p.add_argument("--n", default=None, help="site lengths (default 512,1024,2048,4096)")
    p.add_argument("--model-n", type=int, default=None, help="model sequence length (1024)")
    p.add_argument("--bh", default="1,2", help="site batch,heads (default 1,2)")
    p.add_argument("--d", type=int, default=64, help="site head dim")
    p.add_argument("--only", default="", help="comma list of workloads (gpt2, sigmoid, ...)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no-models", action="store_true")
    p.add_argument("--no-sites", action="store_true")
    p.add_argument("--repeat", type=int, default=None, help="timed calls (default 7; quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved runs per provider (default 3; quick 1)",
    )
    p.add_argument("--timeout", type=float, default=600, help="per subprocess, seconds")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (default: torch's)"
    )
    args = p.parse_args(argv)

    if args.worker:
        res = _worker(json.loads(args.worker))
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    if args.n is None:
        args.n = "512" if args.quick else "512,1024,2048,4096"
    args.n = [int(x) for x in args.n.split(",")]
    repeat = args.repeat or (3 if args.quick else 7)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.quick:
        args.warmup = min(args.warmup, 1)
        if not args.only:
            args.only = "gpt2-eager,softmax,causal,sigmoid,temperature,softcap"
    bh = [int(x) for x in args.bh.split(",")]
    providers = args.providers.split(",")
    modes = args.modes.split(",")

    import torch

    meta = {
        "device": f"CPU: {platform.processor() or platform.machine()}, "
        f"{args.threads or torch.get_num_threads()} torch threads, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "repeat": repeat,
        "rounds": rounds,
    }
    try:
        meta["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    results = []
    t_start = time.time()
    for work, n in _workloads(args):
        r = {"work": work, "n": n, "providers": {}}
        if work in SITES:
            r["shape"] = {"B": bh[0], "H": bh[1], "N": n, "D": args.d}
        runs: dict[str, list[dict]] = {}
        for rnd in range(rounds):  # interleaved: drift on a shared machine hits all alike
            for prov in providers:
                if prov == "sdpa" and work not in SITES:
                    continue
                spec = dict(
                    provider=prov, work=work, n=n, bh=bh, d=args.d, modes=modes,
                    warmup=args.warmup, repeat=repeat, threads=args.threads,
                )  # fmt: skip
                runs.setdefault(prov, []).append(_run_one(spec, args.timeout))
                print(f"[{time.time() - t_start:6.0f}s] {work} N={n} {prov} round {rnd + 1}: "
                      + ", ".join(f"{m} {_fmt_ms(v)} ms" for m, v in runs[prov][-1].items()),
                      file=sys.stderr, flush=True)  # fmt: skip
        r["providers"] = {prov: _best(rs, modes) for prov, rs in runs.items()}
        for mode in modes:
            i, a, o = (
                r["providers"].get(x, {}).get(mode) for x in ("inductor", "attnfx", "attnfx-op")
            )
            r.setdefault("ratios", {})[mode] = {
                "speed_attnfx_over_inductor": _ratio(i, a, "ms"),
                "speed_op_over_inductor": _ratio(i, o, "ms"),
                "mem_attnfx_over_inductor": _ratio(a, i, "peak_mib"),
            }
        results.append(r)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
