"""DTensor sharding rules for the attnfx ops (tensor parallelism).

With tensor parallelism (``parallelize_module`` with column-wise q/k/v projections and
``use_local_output=False``) q, k and v reach a site as DTensors sharded on heads.  These
rules let DTensor run ``attnfx::attention``, ``attnfx::attention_backward`` and
``attnfx::attention_aux_backward`` on the local shards, with no redistribution, wherever
that is exact:

* batch (dim 0) and heads (dim 1) of every operand and result may be sharded, all the
  same way on each mesh dim; lengths and head dims are replicated (a query knows its
  position only by its index, and the masks read positions);
* heads only when every shard holds whole GQA groups: the kv heads divide evenly over the
  shards of the head dim (then query head j of a shard reads kv head j // group of the
  same shard);
* replicated everywhere is always allowed (any other input placement is redistributed
  to one of these by DTensor).

Registered on first use (``register``): importing ``torch.distributed.tensor`` costs about
a second, so neither ``import attnfx`` nor a model without DTensors pays it.  The rules
use DTensor's strategy registration (``register_sharding`` does the same, but its
strategies can neither return a list of tensors, as the aux backward does, nor check a
sharding across mesh dims, as GQA needs).
"""

from __future__ import annotations

import logging
import sys
import threading

import torch

log = logging.getLogger("attnfx")

_lock = threading.Lock()
_registered = False


def is_dtensor(x) -> bool:
    """Whether ``x`` is a DTensor (without importing DTensor when nothing made one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


# (op name, index of the spec argument, number of outputs (None: len(which)),
#  index of q and of k among the flattened tensor inputs)
_OPS = (
    ("attention", 4, 2, 0, 1),
    ("attention_backward", 7, 3, 1, 2),
    ("attention_aux_backward", 7, None, 1, 2),
)


def register() -> bool:
    """Register the sharding rules (once per process); False where DTensor is missing."""
    global _registered
    if _registered:
        return True
    with _lock:
        if _registered:
            return True
        if not torch.distributed.is_available():
            return False
        try:
            from torch.distributed.tensor import DTensor
            from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
        except ImportError as e:  # a torch without DTensor: sites on DTensors stay kept
            log.debug("attnfx: no DTensor sharding rules: %s", e)
            return False
        prop = DTensor._op_dispatcher.sharding_propagator
        for name, spec_at, n_out, q_at, k_at in _OPS:
            op = getattr(torch.ops.attnfx, name).default
            strategy = _strategy(n_out, q_at, k_at, spec_at)
            # the spec (and ``which``) in the cache key: the number of outputs depends on it
            prop.register_op_strategy(
                op, strategy, RuntimeSchemaInfo(static_argnum=spec_at, needs_pytree=True)
            )
        _registered = True
        return True


def _strategy(n_out: int | None, q_at: int, k_at: int, spec_at: int):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy

    def strategy(op_schema):
        mesh = op_schema.get_mesh_from_args()
        n_in = len(op_schema.args_strategy)
        # (a list result: one gradient per index of ``which``, the argument after the spec)
        outs = n_out if n_out is not None else len(op_schema.args_schema[spec_at + 1])
        rules = [[Replicate()] * (outs + n_in)]
        for dim in (0, 1):  # batch, heads
            rules.append([Shard(dim)] * (outs + n_in))

        def valid(input_specs, output_specs) -> bool:
            return _whole_groups(input_specs[q_at], input_specs[k_at])

        res = expand_to_full_mesh_op_strategy(
            mesh,
            op_schema,
            rules,
            input_index=outs,
            is_valid_strategy_cb=valid,
        )
        if n_out is None:
            # a list result: its specs must be a sequence even when it holds one tensor
            for s in res.strategies:
                if not isinstance(s.output_specs, (tuple, list)):
                    s.output_specs = (s.output_specs,)
        return res

    return strategy


def _whole_groups(q_spec, k_spec) -> bool:
    """Whether q and k are sharded alike on heads with whole GQA groups per shard."""
    from torch.distributed.tensor import Shard
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    if q_spec.placements != k_spec.placements:
        return False
    shards = 1
    for size, p in zip(k_spec.mesh.shape, k_spec.placements):
        if isinstance(p, Shard) and p.dim == 1:
            shards *= size
    if shards == 1:
        return True
    hq, hk = q_spec.tensor_meta.shape[1], k_spec.tensor_meta.shape[1]
    return bool(guard_or_false(hk % shards == 0) and guard_or_false(hq % hk == 0))
