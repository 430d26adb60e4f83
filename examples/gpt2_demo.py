"""Compile a transformers GPT-2 (small config, random init, no download) with attnfx,
print the explain report and the largest difference from eager."""

import torch
import transformers

import attnfx
import attnfx._compat

attnfx._compat.ensure_torchvision_importable()  # see attnfx/_compat.py

torch.manual_seed(0)
config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, n_positions=128, vocab_size=1000)
config._attn_implementation = "eager"
model = transformers.GPT2LMHeadModel(config).eval()
ids = torch.randint(0, config.vocab_size, (2, 48))

# Inference, as the model runs below.  (With gradients on CPU, the backend leaves these
# sites to inductor, whose code is faster there for training: option cpu="auto".)
with torch.no_grad():
    print(attnfx.explain(model, ids))

compiled = torch.compile(model, backend="attnfx")
with torch.no_grad():
    eager = model(ids).logits
    fused = compiled(ids).logits
print(f"max |attnfx - eager| over the logits: {(fused - eager).abs().max().item():.3e}")
print("counters:", dict(attnfx.counters))
