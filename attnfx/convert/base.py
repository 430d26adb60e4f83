"""What every conversion shares: the error type, the supported architectures, the layer
selection, and the plan a conversion hands to the writer.

A conversion never computes the whole model: it reads the source's tensor index (names,
dtypes, shapes), says which tensors it changes (``Plan.changed``: a function of the
source tensor, called one tensor at a time) and which it adds (``Plan.added``), and what
the config gains.  Everything it does not name is copied byte for byte.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch

CONFIG_KEY = "attnfx"  # the config.json field that says what a converted model runs
FORMAT_VERSION = 1
ADDED_FILE = "attnfx.safetensors"  # the tensors a conversion adds (transformers ignores it)
REPORT_FILE = "convert_report.json"
KINDS = ("sigmoid", "selective", "gqa", "neighborhood", "window", "routed")


class ConvertError(Exception):
    """Bad input or a conversion that cannot be done: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Arch:
    """Where a transformers architecture keeps its attention."""

    model_type: str
    # a state-dict key of layer ``i``'s tensors contains ``<layer_prefix>.<i>.``
    layer_prefix: str
    # the attention module (the one that calls the attention interface) of layer i, as a
    # module-name suffix with ``{i}``
    attention: str
    causal: bool  # decoder self-attention
    # the K and V projections inside the attention module, and how they are stored
    # ("linear": (out, in) rows per head; "conv1d": GPT-2's fused (in, 3·out) c_attn)
    k_proj: str | None = None
    v_proj: str | None = None
    grid: bool = False  # an image model: a CLS token, then an (h, w) grid of patches
    native_gqa: bool = False  # the config has num_key_value_heads

    def layer_of(self, key: str) -> int | None:
        m = re.search(rf"(?:^|\.){re.escape(self.layer_prefix)}\.(\d+)\.", key)
        return int(m.group(1)) if m else None

    def attention_pattern(self) -> re.Pattern:
        body = re.escape(self.attention).replace(r"\{i\}", r"(\d+)")
        return re.compile(rf"(?:^|\.){body}$")


_LLAMA_LIKE = dict(
    layer_prefix="layers",
    attention="layers.{i}.self_attn",
    causal=True,
    k_proj="k_proj",
    v_proj="v_proj",
    native_gqa=True,
)

ARCHS: dict[str, Arch] = {
    "gpt2": Arch("gpt2", layer_prefix="h", attention="h.{i}.attn", causal=True),
    "llama": Arch("llama", **_LLAMA_LIKE),
    "mistral": Arch("mistral", **_LLAMA_LIKE),
    "qwen2": Arch("qwen2", **_LLAMA_LIKE),
    "qwen3": Arch("qwen3", **_LLAMA_LIKE),
    "bert": Arch("bert", layer_prefix="layer", attention="layer.{i}.attention.self", causal=False),
    "vit": Arch("vit", layer_prefix="layers", attention="layers.{i}.attention", causal=False, grid=True),
}  # fmt: skip


def arch_of(config: dict) -> Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise ConvertError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(ARCHS)}"
        )
    return ARCHS[model_type]


def num_layers(config: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ConvertError("config.json has no layer count (num_hidden_layers)")


def num_heads(config: dict) -> int:
    for key in ("num_attention_heads", "n_head"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ConvertError("config.json has no head count (num_attention_heads)")


def head_dim(config: dict) -> int:
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden = config.get("hidden_size", config.get("n_embd"))
    if not isinstance(hidden, int):
        raise ConvertError("config.json has no hidden size (hidden_size)")
    return hidden // num_heads(config)


def parse_layers(spec: str | None, n: int) -> tuple[int, ...]:
    """``None`` / ``"all"``: every layer; else comma-separated indices and ranges
    (``0-3,6``; ``-1`` is the last layer)."""
    if spec is None or spec.strip() == "all":
        return tuple(range(n))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise ConvertError(f"--layers {spec!r}: cannot read {part!r} (expected e.g. 0-3,6)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 0 and m.group(2) is None:
            lo = hi = n + lo
        if lo > hi:
            raise ConvertError(f"--layers {spec!r}: empty range {part!r}")
        if lo < 0 or hi >= n:
            raise ConvertError(f"--layers {spec!r}: the model has layers 0-{n - 1}")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclasses.dataclass
class Change:
    """A source tensor rewritten: ``fn(source) -> new`` (same name), ``info`` its result's
    dtype and shape, known before anything is computed."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    info: TensorInfo
    why: str


@dataclasses.dataclass
class Plan:
    kind: str  # the --to kind
    site_kind: str  # what attnfx reports the converted sites as
    layers: tuple[int, ...]
    changed: dict[str, Change] = dataclasses.field(default_factory=dict)
    added: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    config_updates: dict = dataclasses.field(default_factory=dict)  # plain config fields
    attnfx: dict | None = None  # the CONFIG_KEY section; None: the result is native
    needs_finetuning: bool = False
    exact: bool = False  # outputs equal the source's by construction
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Source:
    """What a conversion may look at: the config and the tensor index (no tensor data)."""

    config: dict
    arch: Arch
    tensors: dict[str, TensorInfo]
    layers: tuple[int, ...]
    options: dict
    seed: int
    calib: dict | None  # model inputs for calibration, when given
    source_path: str
