"""Every conversion on tiny saved transformers models: it runs, the result loads, and the
attnfx backend rewrites every site as the new kind; exact conversions reproduce the
source; untouched tensors keep their bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import attnfx
from attnfx.convert import ConvertError
from attnfx.convert.hf import model_class

# (to, options, architectures)
CASES = [
    # GPT-2 sigmoid: test_compiled_counters_count_the_new_kind; LLaMA window:
    # test_partial_layers_keep_softmax_elsewhere
    # LLaMA sigmoid: test_sigmoid_options_add_qk_norm_and_layerscale
    ("sigmoid", {}, ("bert", "vit")),
    ("window", {"window": 5}, ("gpt2", "bert", "vit")),
    # decoders: the causal neighborhood is the window (same code path)
    ("neighborhood", {"kernel_size": 3}, ("bert", "vit")),
    ("gqa", {"kv_heads": 2}, ("llama",)),
    # decoders (causal: keys routed with their queries' clusters), unpadded inputs
    ("routed", {"clusters": 3}, ("gpt2", "llama")),
]
MATRIX = [(to, opts, arch) for to, opts, archs in CASES for arch in archs]
# the rewrite is what is checked (verified on the real inputs): no inductor compile; the op
# runs on CPU wherever attnfx can (routed sites are kept on CPU by default: inductor wins)
EXPLAIN = {"inner": "eager", "random_trials": 0, "cpu": "always"}


def _source(path):
    cfg = json.loads((path / "config.json").read_text())
    return model_class(cfg).from_pretrained(path).eval()


def _main(out):
    return getattr(out, "logits", None) if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("to,opts,arch", MATRIX, ids=[f"{t}-{a}" for t, _, a in MATRIX])
def test_converted_sites_rewritten_as_new_kind(sources, tmp_path, to, opts, arch, inputs_of):
    dst = tmp_path / "out"
    report = attnfx.convert(sources[arch], to=to, out=dst, **opts)
    assert (dst / "convert_report.json").exists() and (dst / "config.json").exists()
    model = attnfx.from_pretrained(dst).eval()
    inputs = inputs_of(arch)
    rep = attnfx.explain(model, **inputs, options=EXPLAIN)
    assert len(rep.sites) == 2 and not rep.kept, str(rep)
    want = report.site_kind
    assert {s.kind for s in rep.sites} == {want}, str(rep)
    if to == "gqa":
        assert all(s.spec.gqa_group == 2 for s in rep.sites), str(rep)
    if to == "sigmoid":
        assert all(s.spec.activation == "sigmoid" for s in rep.sites), str(rep)
    if to in ("window", "neighborhood") and arch != "vit":
        assert all(s.mask_text.startswith("neighborhood 1-D") for s in rep.sites), str(rep)
    # the report's verdicts
    assert report.drift is not None and len(report.drift) == 2
    if to in ("sigmoid", "gqa", "routed"):
        assert report.needs_finetuning is True
    data = json.loads((dst / "convert_report.json").read_text())
    assert data["kind"] == to and data["site_kind"] == want


def test_vit_neighborhood_is_a_2d_grid_with_a_global_cls(sources, tmp_path):
    attnfx.convert(sources["vit"], to="neighborhood", out=tmp_path / "o", kernel_size=3)
    model = attnfx.from_pretrained(tmp_path / "o").eval()
    attn = model.vit.layers[0].attention
    from attnfx.convert.hf import _window_keep

    keep = _window_keep(attn, 17, 17, "cpu")
    assert keep[0].all() and keep[:, 0].all()
    patch = keep[1:, 1:]
    assert (patch.sum(-1) == 9).all()  # 3x3 neighbors for every patch, shifted at borders
    assert patch[0].reshape(4, 4)[:3, :3].all()  # the corner's window shifts inward
    assert patch[5].reshape(4, 4)[0:3, 0:3].all()  # patch (1, 1): rows/cols 0-2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "vit"])
def test_selective_reproduces_source(sources, tmp_path, arch, inputs_of):
    report = attnfx.convert(sources[arch], to="selective", out=tmp_path / "o")
    assert report.exact and report.needs_finetuning is False
    src, conv = _source(sources[arch]), attnfx.from_pretrained(tmp_path / "o").eval()
    inputs = inputs_of(arch)
    with torch.no_grad():
        torch.testing.assert_close(_main(conv(**inputs)), _main(src(**inputs)))
    if arch in ("llama", "bert"):
        return  # masks as GPT-2's (causal) / covered by BERT's other kinds: suite time
    rep = attnfx.explain(conv, **inputs, options=EXPLAIN)
    assert len(rep.sites) == 2 and not rep.kept, str(rep)
    assert {s.kind for s in rep.sites} == {"temperature"}, str(rep)


def test_gqa_group_one_reproduces_source_and_loads_natively(sources, tmp_path, inputs_of):
    import transformers

    report = attnfx.convert(sources["llama"], to="gqa", out=tmp_path / "o", kv_heads=4)
    assert report.exact and not report.rows("added")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "o").eval()
    src = _source(sources["llama"])
    inputs = inputs_of("llama")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, src(**inputs).logits)


def test_gqa_pools_kv_heads_by_mean(sources, tmp_path):
    import transformers

    attnfx.convert(sources["llama"], to="gqa", out=tmp_path / "o", kv_heads=2)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "o")
    src = _source(sources["llama"])
    for name in ("k_proj", "v_proj"):
        w = getattr(src.model.layers[1].self_attn, name).weight  # (4 heads x 16, 64)
        want = w.reshape(2, 2, 16, 64).mean(1).reshape(32, 64)
        got = getattr(plain.model.layers[1].self_attn, name).weight
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "vit"])
def test_gqa_without_native_gqa_is_refused(sources, tmp_path, arch):
    with pytest.raises(ConvertError, match="native grouped-query attention"):
        attnfx.convert(sources[arch], to="gqa", out=tmp_path / "o", kv_heads=1)
    assert not (tmp_path / "o").exists()


def _raw(path, name):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        b, e = header[name]["data_offsets"]
        f.seek(8 + n + b)
        return f.read(e - b)


def test_untouched_tensors_byte_identical(sources, tmp_path):
    src = sources["llama"]
    report = attnfx.convert(src, to="gqa", out=tmp_path / "o", kv_heads=2, evaluate=False)
    changed = {r.name for r in report.rows("changed")}
    assert changed and all(n.endswith(("k_proj.weight", "v_proj.weight")) for n in changed)
    with safe_open(src / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert {r.name for r in report.rows("untouched")} == set(names) - changed
    for name in names:
        same = _raw(src / "model.safetensors", name) == _raw(tmp_path / "o/model.safetensors", name)
        assert same == (name not in changed), name


def test_partial_layers_keep_softmax_elsewhere(sources, tmp_path, inputs_of):
    report = attnfx.convert(
        sources["llama"], to="window", out=tmp_path / "o", layers="1", window={1: 4}
    )
    assert report.layers == (1,)
    model = attnfx.from_pretrained(tmp_path / "o").eval()
    rep = attnfx.explain(model, **inputs_of("llama"), options=EXPLAIN)
    assert [s.kind for s in rep.sites] == ["softmax", "neighborhood"], str(rep)
    assert report.drift[0] < 1e-6 < report.drift[1]  # layer 0 untouched


def test_compiled_counters_count_the_new_kind(sources, tmp_path, inputs_of):
    attnfx.convert(sources["gpt2"], to="sigmoid", out=tmp_path / "o", evaluate=False)
    model = attnfx.from_pretrained(tmp_path / "o").eval()
    attnfx.reset_counters()
    compiled = torch.compile(model, backend="attnfx", options={"inner": "eager"})
    inputs = inputs_of("gpt2")
    out = compiled(**inputs).logits
    assert attnfx.counters["rewritten.sigmoid"] == 2, dict(attnfx.counters)
    assert not any(k.startswith("kept.") for k in attnfx.counters)
    with torch.no_grad():
        torch.testing.assert_close(out, model(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_sigmoid_options_add_qk_norm_and_layerscale(sources, tmp_path, inputs_of):
    report = attnfx.convert(
        sources["llama"], to="sigmoid", out=tmp_path / "o", qk_norm=True, layerscale=0.1
    )
    added = {r.name for r in report.rows("added")}
    assert {"layers.0.q_norm", "layers.0.k_norm", "layers.0.layerscale"} <= added
    model = attnfx.from_pretrained(tmp_path / "o").eval()
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.attnfx_layerscale, torch.full((64,), 0.1))
    assert torch.equal(attn.attnfx_q_norm, torch.ones(16))
    # the norms and the scale act: the output differs from the plain sigmoid conversion
    attnfx.convert(sources["llama"], to="sigmoid", out=tmp_path / "p", evaluate=False)
    plain = attnfx.from_pretrained(tmp_path / "p").eval()
    with torch.no_grad():
        a, b = model(**inputs_of("llama")).logits, plain(**inputs_of("llama")).logits
    assert not torch.allclose(a, b)
    rep = attnfx.explain(model, **inputs_of("llama"), options=EXPLAIN)
    assert len(rep.sites) == 2 and {s.kind for s in rep.sites} == {"sigmoid"}, str(rep)
    assert not rep.kept, str(rep)


def test_deterministic(sources, tmp_path):
    for out in ("a", "b"):
        attnfx.convert(sources["bert"], to="selective", out=tmp_path / out, seed=3, evaluate=False)
    for name in ("model.safetensors", "attnfx.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
