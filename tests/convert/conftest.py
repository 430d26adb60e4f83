"""Tiny random transformers models saved with ``save_pretrained`` (no network): the
sources every conversion test converts."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _gpt2():
    c = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64,
        bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(c)


def _llama(kv_heads=4):
    c = transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        hidden_size=64, intermediate_size=64, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(c)


def _bert():
    c = transformers.BertConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertModel(c)


def _vit():
    c = transformers.ViTConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64,
        image_size=16, patch_size=4, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification(c)


BUILDERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "vit": _vit}


def example_inputs(arch: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(0, 64, (2, 12), generator=g)
    if arch == "bert":  # padding in the second sequence: a mask tensor besides the variant's
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids}


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """arch -> the directory of its saved tiny model (float32, seeded)."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        build().eval().save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def sharded_llama(tmp_path_factory):
    """A LLaMA saved in several shards (with ``model.safetensors.index.json``)."""
    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(7)
    _llama().save_pretrained(root / "llama", max_shard_size="40KB")
    return root / "llama"


@pytest.fixture
def inputs_of():
    return example_inputs
