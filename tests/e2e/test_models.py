"""End to end on third-party models built from small configs (random init, no download):
every attention layer is rewritten, and outputs and gradients equal eager under the
equivalence rule (gold: the eager model in float64)."""

from __future__ import annotations

import copy

import pytest
import torch

import attnfx
from attnfx.testing import assert_attention_close

transformers = pytest.importorskip("transformers")


def _gpt2(impl):
    c = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=64,
        vocab_size=100,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    c._attn_implementation = impl
    m = transformers.GPT2Model(c)
    return m, (torch.randint(0, 100, (2, 12)),), 2


def _gpt2_reorder(impl):
    """GPT-2 with ``reorder_and_upcast_attn``: ``baddbmm(empty, q3, kᵀ3, beta=0,
    alpha=...)`` on merged batch·heads, reshaped to 4-D, float32 softmax; the scale also
    depends on the layer (``scale_attn_by_inverse_layer_idx``)."""
    m, inputs, n = _gpt2(impl)
    c = m.config
    c.reorder_and_upcast_attn = True
    c.scale_attn_by_inverse_layer_idx = True
    return transformers.GPT2Model(c), inputs, n


def _bert(impl):
    c = transformers.BertConfig(
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    c._attn_implementation = impl
    m = transformers.BertModel(c)
    ids = torch.randint(0, 100, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 8:] = 0  # padding in the second sequence
    return m, (ids, am), 2


def _llama(impl):
    c = transformers.LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, group 2
        hidden_size=64,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
    )
    c._attn_implementation = impl
    m = transformers.LlamaModel(c)
    return m, (torch.randint(0, 100, (2, 12)),), 2


def _llama_padded(impl):
    m, (ids,), n = _llama(impl)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 9:] = 0  # right padding in the second sequence
    return m, (ids, am), n


def _llama4(impl):
    """Llama-4 text (MoE on every layer, chunked attention): its MoE block adds the routed
    experts' output in place (``out.add_``) and its router fills scores with ``scatter_``,
    both with unused return values next to the attention sites."""
    c = transformers.Llama4TextConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        head_dim=16,
        intermediate_size=128,
        intermediate_size_mlp=128,
        vocab_size=100,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        attention_chunk_size=8,
    )
    c._attn_implementation = impl
    m = transformers.Llama4ForCausalLM(c)
    return m, (torch.randint(0, 100, (2, 12)),), 2


def _gpt_oss(impl):
    """gpt-oss: a learned sink logit per head concatenated to the scores, the row max
    subtracted, the sink's column dropped after the softmax; sliding-window and full
    layers alternate; MoE feed-forward."""
    c = transformers.GptOssConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        head_dim=16,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=5,
    )
    c._attn_implementation = impl
    c._experts_implementation = "eager"  # the grouped-mm experts have no float64 gold
    m = transformers.GptOssModel(c)
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.sinks.normal_(0, 2)  # initialized to zero: make them count
    return m, (torch.randint(0, 100, (2, 12)),), 2


def _t5(impl):
    """T5 encoder: a learnable relative-position bias (bucketed embedding) added to the
    scores; its gradient comes from the op's backward."""
    c = transformers.T5Config(
        num_layers=2,
        num_heads=2,
        d_model=64,
        d_kv=32,
        d_ff=128,
        vocab_size=100,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
    )
    c._attn_implementation = impl
    return transformers.T5EncoderModel(c), (torch.randint(0, 100, (2, 12)),), 2


def _vit(impl):
    timm = pytest.importorskip("timm")
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10, depth=2
    )
    return m, (torch.randn(2, 3, 32, 32),), 2


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


# The mask each model's sites must be read as: causal masks built from index arithmetic
# (HF's additive finfo.min masks included) become predicates the kernel skips blocks by;
# BERT's padding mask is an input, so it stays a tensor.
CASES = [
    ("gpt2", _gpt2, "eager", "causal"),
    ("gpt2", _gpt2, "sdpa", "causal"),
    ("bert", _bert, "eager", "tensor"),
    ("bert", _bert, "sdpa", "tensor"),
    ("llama", _llama, "eager", "causal"),
    ("llama", _llama, "sdpa", "causal"),
    # causal & padding: SDPA's bool mask splits into a causal predicate (block skipping)
    # and the padding tensor; eager's additive finfo.min mask stays one tensor (a fill
    # would zero the gradient of rows padding masks fully, which eager's add does not).
    ("llama_padded", _llama_padded, "eager", "tensor"),
    ("llama_padded", _llama_padded, "sdpa", "predicate+tensor"),
    ("llama4", _llama4, "eager", "tensor"),
    # the sliding-window layer's mask stays a tensor (its full layer's too, in a graph of
    # its own between the eager experts' graph breaks)
    ("gpt_oss", _gpt_oss, "eager", ("tensor", "causal")),
    ("t5_encoder", _t5, "eager", "tensor"),
    ("vit_tiny", _vit, "timm", "none"),
]


@pytest.mark.parametrize("name,build,impl,mask", CASES, ids=[f"{n}-{i}" for n, _, i, _ in CASES])
def test_model_rewritten_and_equal(name, build, impl, mask):
    torch.manual_seed(0)
    model, inputs, n_layers = build(impl)
    model.eval()

    report = attnfx.explain(model, *inputs)
    assert report.count("softmax") == n_layers, str(report)
    assert not report.kept, str(report)
    kinds = [s.spec.mask_class.kind for s in report.rewritten]
    assert set(kinds) <= set(mask) if isinstance(mask, tuple) else set(kinds) == {mask}, report
    if name.startswith(("llama", "gpt_oss")):
        assert all(s.spec.gqa_group == 2 for s in report.rewritten), str(report)
    if name == "gpt_oss":
        assert all(s.spec.sink is not None for s in report.rewritten), str(report)

    gold_model = copy.deepcopy(model).double()
    attnfx.reset_counters()
    compiled = torch.compile(model, backend="attnfx")
    out = _first_tensor(compiled(*inputs))
    base = _first_tensor(model(*inputs))
    gold = _first_tensor(gold_model(*[x.double() if x.is_floating_point() else x for x in inputs]))
    assert attnfx.counters["rewritten.softmax"] == n_layers
    assert_attention_close(out, base, gold, check_strides=False)

    # Gradients of every parameter, through the rewritten sites.
    cot = torch.randn_like(base)
    grads = {}
    for label, m, o in (("cand", model, out), ("base", model, base), ("gold", gold_model, None)):
        m.zero_grad(set_to_none=True)
        if o is None:
            o = _first_tensor(m(*[x.double() if x.is_floating_point() else x for x in inputs]))
        o.backward(cot.to(o.dtype))
        grads[label] = {
            n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None
        }
    # A compiled graph returns zero gradients (not None) for parameters that only feed
    # outputs the loss does not use (e.g. BERT's pooler).
    assert grads["base"].keys() <= grads["cand"].keys()
    for pname in grads["cand"].keys() - grads["base"].keys():
        assert not grads["cand"][pname].any(), pname
    for pname in grads["base"]:
        assert_attention_close(
            grads["cand"][pname],
            grads["base"][pname],
            grads["gold"][pname],
            grad=True,
            check_strides=False,
            context=pname,
        )


def test_gpt2_reorder_and_upcast_rewritten_and_equal():
    """Its attention raises unless the scores are float32, so there is no float64 gold:
    outputs and parameter gradients are held to eager's float32 values, closely."""
    torch.manual_seed(0)
    model, inputs, n_layers = _gpt2_reorder("eager")
    model.eval()
    report = attnfx.explain(model, *inputs)
    assert report.count("softmax") == n_layers and not report.kept, str(report)
    assert all(s.spec.mask_class.kind == "causal" for s in report.rewritten), str(report)
    attnfx.reset_counters()
    compiled = torch.compile(model, backend="attnfx")
    out = _first_tensor(compiled(*inputs))
    assert attnfx.counters["rewritten.softmax"] == n_layers
    base = _first_tensor(model(*inputs))
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    cot = torch.randn_like(base)
    grads = []
    for o in (out, base):
        model.zero_grad(set_to_none=True)
        o.backward(cot)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_timm_swin_shifted_block_rewritten(name):
    """Both blocks, the shifted one's per-window mask included (added through a 5-D view
    of the scores).  Frozen weights: a learnable relative bias is a separate matter."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(
        name, pretrained=False, img_size=56, window_size=7, num_classes=10,
        depths=(2,), num_heads=(2,), embed_dim=32,
    ).eval().requires_grad_(False)  # fmt: skip
    x = torch.randn(2, 3, 56, 56)
    report = attnfx.explain(m, x)
    assert len(report.rewritten) == 2 and not report.kept, str(report)
    gold = copy.deepcopy(m).double()(x.double())
    attnfx.reset_counters()
    out = torch.compile(m, backend="attnfx")(x)
    assert sum(v for k, v in attnfx.counters.items() if k.startswith("rewritten.")) == 2
    assert_attention_close(out, m(x), gold, check_strides=False)
