"""Helpers of the distributed tests: a small transformer, and a 2-process gloo run on
127.0.0.1 whose workers hand their results back through files."""

from __future__ import annotations

import os
import pickle
import socket
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2
D, HEADS, N, LAYERS = 32, 2, 16, 2  # head dim 16: the smallest the kernels take


def skip_without_gloo():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this torch build")


class Attention(nn.Module):
    """Written as tensor-parallel code writes it: heads from the projection's width
    (``view(b, n, -1, head_dim)``), so that it runs on local heads too."""

    def __init__(self, d: int = D, heads: int = HEADS, causal: bool = True):
        super().__init__()
        self.head_dim, self.causal = d // heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        s = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if self.causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            s = s.masked_fill(~mask, float("-inf"))
        p = s.softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, d: int = D, heads: int = HEADS, causal: bool = True):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, causal)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class Model(nn.Module):
    def __init__(self, d: int = D, heads: int = HEADS, layers: int = LAYERS, causal: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, causal) for _ in range(layers))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def reference_grads(model: nn.Module, x: torch.Tensor, dtype=torch.float32) -> dict:
    """Single-process eager gradients of ``loss_fn`` on the whole batch ``x``."""
    import copy

    m = copy.deepcopy(model).to(dtype)
    loss_fn(m(x.to(dtype))).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, outdir: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the suite's settings reach the workers through the environment they inherit
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two workers on two cores
    warnings.filterwarnings("ignore")
    try:
        res = fn(rank, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)


def spawn(fn, tmp_path, *args) -> list:
    """Run ``fn(rank, *args)`` on ``WORLD`` gloo processes; their return values, by rank.
    ``fn`` must be importable (a module-level function)."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, _free_port(), str(tmp_path), args), nprocs=WORLD, join=True)
    out = []
    for r in range(WORLD):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            out.append(pickle.load(f))
    return out


def grads_close(cand: dict, base: dict, gold: dict) -> list[str]:
    """The parameters whose gradient fails the equivalence rule (attnfx.testing.compare:
    at most 3x eager float32's error against a float64 gold, plus a rounding floor)."""
    from attnfx.testing import compare

    bad = []
    for name, g in cand.items():
        res = compare(
            g, base[name], gold[name], grad=True, check_strides=False, context=f"grad of {name}"
        )
        if not res.ok:
            bad.append(res.message)
    return bad
