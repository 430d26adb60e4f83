"""Sigmoid attention and selective (temperature) attention written in plain PyTorch
(attnfx.nn's reference modules), compiled with attnfx: the report shows each site's kind,
mask and score program, and the outputs match eager."""

import torch
from torch import nn

import attnfx
from attnfx.nn import SelectiveAttention, SigmoidAttention


class Block(nn.Module):
    def __init__(self, attn: nn.Module, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attn

    def forward(self, x):
        return x + self.attn(self.norm(x))


torch.manual_seed(0)
dim, heads = 128, 4
model = nn.Sequential(
    Block(SigmoidAttention(dim, heads, causal=True), dim),
    Block(SelectiveAttention(dim, heads, causal=True), dim),
).eval()
with torch.no_grad():  # move the selective temperature away from its identity init
    model[1].attn.tau_q.weight.normal_(std=0.05)
x = torch.randn(2, 64, dim)

# cpu="always": rewrite on CPU too (by default the backend leaves sigmoid sites to
# inductor on CPU, whose fused code is faster there; on the GPU they run attnfx's kernel)
opts = {"cpu": "always"}
print(attnfx.explain(model, x, options=opts))
compiled = torch.compile(model, backend="attnfx", options=opts)
with torch.no_grad():
    diff = (compiled(x) - model(x)).abs().max().item()
print(f"max |attnfx - eager|: {diff:.3e}")
