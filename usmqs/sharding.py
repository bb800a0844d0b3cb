"""Device mesh and logical-axis sharding.

Modules name their parameter and activation axes logically (``embed``, ``mlp``,
``heads``, ``layers``, ``batch`` ...); the config maps names to mesh axes (``data``,
``fsdp``, ``tensor``). A logical axis whose size is not divisible by its mesh axes is
replicated instead (a small model on a big mesh still compiles), and no mesh axis is
used twice in one array.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights shard their `embed` axis over fsdp (ZeRO-3 style),
# their wide axes (mlp, heads, vocab) over tensor; the batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("vocab", ("tensor",)),
    ("kv", ()),
    ("time", ()),
    ("layers", ()),
    ("conv_window", ()),
)


def mesh_config(**sizes: int) -> ml_collections.ConfigDict:
    """Config block: mesh axis sizes (-1 = all remaining devices) and logical rules."""
    cfg = ml_collections.ConfigDict()
    cfg.data = sizes.get("data", -1)
    cfg.fsdp = sizes.get("fsdp", 1)
    cfg.tensor = sizes.get("tensor", 1)
    cfg.rules = tuple((name, tuple(axes)) for name, axes in DEFAULT_RULES)
    return cfg


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Fill in the one -1 axis so that the product equals `num_devices`."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"{num_devices} available"
        )
    return tuple(shape)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape({a: mesh_cfg[a] for a in MESH_AXES}, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_pspec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Sequence[str]]],
) -> PartitionSpec:
    """Map logical names of one array to a PartitionSpec for `mesh`."""
    if names is None:
        return PartitionSpec()
    table = {name: tuple(axes) for name, axes in rules}
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh, rules):
    """NamedShardings for every leaf of `abstract_tree` from its logical names.

    `logical_tree` has the same structure with a PartitionSpec of logical names (or None)
    per leaf, as `nnx.get_partition_spec` returns.
    """

    def one(x, spec):
        names = None if spec is None else tuple(spec)
        return NamedSharding(mesh, logical_to_pspec(names, x.shape, mesh, rules))

    return jax.tree.map(
        one, abstract_tree, logical_tree, is_leaf=lambda s: s is None or isinstance(s, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, ndim: int, rules) -> NamedSharding:
    """Shard a batch's leading axis over the `batch` rule's mesh axes, the rest replicated."""
    axes = tuple(a for a in dict((n, tuple(v)) for n, v in rules).get("batch", ()))
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))
