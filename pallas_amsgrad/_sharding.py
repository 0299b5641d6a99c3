"""The step on sharded arrays: each device updates its own shards, in place.

A Pallas call is opaque to XLA's SPMD partitioner, which would gather every
operand whole onto every device to run it. AMSGrad is elementwise, so each
device can instead run a dtype group on its own shards of the group's leaves,
with no communication at all, as long as a leaf's param, mu, nu and nu_max are
split the same way (checked here, naming the leaf). Grads that are split
differently are resharded to the param's layout: in a training step they are
the compiler's own intermediate, and that is what optax's step does with them.

Two routes, by when the shardings are known:

- Under a mesh with Explicit axes (`jax.set_mesh`), shardings are part of the
  types at trace time: the group runs inside `jax.shard_map`, and bad
  shardings raise while tracing.
- Otherwise (Auto axes, the default) the partitioner only settles shardings
  after tracing: the group is a `custom_partitioning` op whose partition
  callback receives them and lowers the group on per-device shapes. Bad
  shardings raise from that callback, during compilation, before anything
  runs; concrete arrays are also checked while tracing. A program on one
  device inlines the op; a process with one device calls the group directly.

Both routes run the same group function (the Pallas kernel or the XLA path)
on each device's shards, in the leaves' own dtypes and with the same
coefficients, so a sharded step gives the unsharded step's bits.

The training recipe's global norm is the one sum over all leaves:
`sum_per_shard` takes it by the same two routes, each device summing its own
shards, and adds the devices' partial sums in one scalar all-reduce.

Neither route, nor a kernel writing in place, has derivatives of its own,
so both functions run them inside a `jax.custom_jvp`: its values are theirs
(the kernel's bits), its derivatives those of the same math in plain XLA ops
on the whole arrays (the XLA path; a plain sum), which the partitioner
splits like any other ops. `jax.grad`, `jvp` and `vjp` so go through every
implementation, on one device or a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from jax._src.state.discharge import discharge_state  # jax<0.12, see _without_refs
from jax.experimental.custom_partitioning import (
    SdyShardingRule,
    custom_partitioning,
)
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pallas_amsgrad import _implementations, _math, _rounding


class _Group(NamedTuple):
    """The static description of one group call (hashable)."""

    implementation: Any  # An `_implementations` object.
    paths: tuple[str, ...]  # Each leaf's key path, e.g. "['dense']['w']".
    out_dtypes: tuple[Any, ...]
    operands: _math.Operands

    def run(self, coefficients, leaves, keys=None, *, layout=None):
        """The group on `leaves` (whole, or this device's shards). Where it
        rounds stochastically, `keys` are its `_rounding.Streams.keys` and
        `layout` (`_ShardLayout`) places the shards in their whole leaves."""
        streams = None
        if self.operands.rounds_stochastically:
            layout = layout or _ShardLayout.whole(leaves)
            streams = layout.streams(keys)
        return _implementations.call(
            self.implementation,
            coefficients,
            leaves,
            out_dtypes=self.out_dtypes,
            operands=self.operands,
            streams=streams,
        )


class _ShardLayout(NamedTuple):
    """How a group's leaves are split over the mesh (static): each leaf's
    whole shape and its PartitionSpec, and the mesh's axis sizes."""

    shapes: tuple[tuple[int, ...], ...]
    specs: tuple[Any, ...]
    mesh_sizes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def whole(cls, leaves) -> _ShardLayout:
        return cls(tuple(leaf[0].shape for leaf in leaves), (None,) * len(leaves))

    def streams(self, keys) -> _rounding.Streams:
        """The leaves' streams, with this device's shard offsets (read from
        its mesh axis indices, so only inside a per-device function)."""
        sizes = dict(self.mesh_sizes)
        starts = []
        for shape, spec in zip(self.shapes, self.specs, strict=True):
            entries = tuple(spec or ()) + (None,) * (len(shape) - len(spec or ()))
            dims = []
            for size, entry in zip(shape, entries, strict=True):
                axes = _axes(entry)
                shard = 0
                for axis in axes:  # The first axis is the major one.
                    shard = shard * sizes[axis] + jax.lax.axis_index(axis)
                ways = math.prod(sizes[axis] for axis in axes)
                dims.append(shard * (size // ways) if axes else 0)
            starts.append(tuple(dims))
        return _rounding.Streams(keys, tuple(starts), self.shapes)


def per_shard(
    implementation: Any,
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    paths: Sequence[str],
    out_dtypes: Sequence[Any],
    operands: _math.Operands,
    keys: jax.Array | None = None,
) -> list[tuple[jax.Array, ...]]:
    """`implementation` run on each device's shards of `leaves`; see the
    module doc.

    Args:
      implementation: an `_implementations` object, called as
        `implementation(coefficients, leaves, out_dtypes=..., operands=...)`.
      coefficients: the group's runtime scalars (replicated).
      leaves: per leaf, its inputs in `operands` order.
      paths: each leaf's key path, to name it in errors.
      out_dtypes, operands: passed on to `implementation`.
      keys: uint32 (leaves, 4), the stream keys, where `operands` rounds
        stochastically; each device's bits are those of its elements' places
        in the whole leaves.

    Returns:
      Per leaf, its outputs in `operands` order, each sharded as the leaf's
      param (or, for `update`, its mu). Their derivatives (jvp, vjp, grad)
      are the XLA path's on the whole arrays, whatever the implementation.
    """
    group = _Group(implementation, tuple(paths), tuple(out_dtypes), operands)
    leaves = [tuple(leaf) for leaf in leaves]
    if keys is None:  # A replicated operand of the partitioned op, unread.
        keys = jnp.zeros((len(leaves), 4), jnp.uint32)
    if jax.device_count() == 1:
        if isinstance(implementation, _implementations.Xla):
            return group.run(coefficients, leaves, keys)  # Differentiable as is.
    elif not _explicit_axes(jax.sharding.get_abstract_mesh()):
        _check_partitioned(group, leaves)
    return _with_xla_derivatives(group, coefficients, leaves, keys)


def _check_partitioned(group: _Group, leaves) -> None:
    """The checks of a partitioned group that must precede its tracing."""
    if not jax.config.jax_use_shardy_partitioner:
        raise ValueError(
            "the AMSGrad step on several devices needs jax's default Shardy "
            "partitioner (jax_use_shardy_partitioner=True), or a mesh of "
            "Explicit axes"
        )
    for path, leaf in zip(group.paths, leaves, strict=True):
        # Concrete arrays (an eager call) carry their shardings: check now.
        shardings = [_concrete_named_sharding(x) for x in leaf]
        check_leaf(path, group.operands, leaf[0].shape, shardings)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _with_xla_derivatives(group: _Group, coefficients, leaves, keys):
    """The group per shard, differentiable: its values are the group's own
    (the kernel's bits), its derivatives the XLA path's on the whole arrays.

    Neither a pallas_call that writes in place nor custom_partitioning has a
    JVP; the XLA path is the same block math in differentiable ops, which
    the partitioner splits like any other. Reverse mode transposes the
    tangent half of that JVP, which is linear.
    """
    # jit discharges refs at its top level only, not inside a custom_jvp.
    run = _without_refs(functools.partial(_run_per_shard, group))
    return run(coefficients, leaves, keys)


def _run_per_shard(group: _Group, coefficients, leaves, keys):
    if jax.device_count() == 1:  # Nothing to partition.
        return group.run(coefficients, leaves, keys)
    mesh = jax.sharding.get_abstract_mesh()
    explicit_axes = _explicit_axes(mesh)
    if explicit_axes:
        return _in_shard_map(group, mesh, explicit_axes, coefficients, leaves, keys)
    return _partitioned_group(coefficients, leaves, keys, group)


@_with_xla_derivatives.defjvp
def _xla_group_jvp(group: _Group, primals, tangents):
    coefficients, leaves, _ = primals
    # Stochastic rounding differentiates as rounding to nearest does
    # (straight-through, `_rounding`): the tangents need no random bits.
    nearest = group._replace(
        implementation=_implementations.IMPLEMENTATIONS["xla"],
        operands=dataclasses.replace(
            group.operands, stochastic=(False,) * len(group.operands.stochastic)
        ),
    )
    _, output_tangents = jax.jvp(nearest.run, (coefficients, leaves), tangents[:2])
    return _with_xla_derivatives(group, *primals), output_tangents


def check_leaf(
    path: str,
    operands: _math.Operands,
    shape: tuple[int, ...],
    shardings: Sequence[Any],
) -> Any:
    """Raises unless one leaf's operands can be updated shard by shard.

    Args:
      path: the leaf's key path.
      operands: the order of the leaf's inputs (`_math.STEP` or `UPDATE`).
      shape: the leaf's (global) shape.
      shardings: each input's `jax.sharding.Sharding`, or None if unknown.

    Returns:
      The leaf's reference sharding (its param's, else its mu's), or None.
    """
    names = operands.tree_names
    reference_name = names[operands.reference_index] + path
    reference = shardings[operands.reference_index]
    for index, (name, sharding) in enumerate(zip(names, shardings, strict=True)):
        if index == operands.grad_index or sharding is None:
            continue
        if reference is None:
            reference, reference_name = sharding, name + path
        elif not _same_layout(sharding, reference, len(shape)):
            raise ValueError(
                f"{name}{path} is sharded as {_describe(sharding, len(shape))} "
                f"but {reference_name} as {_describe(reference, len(shape))}; "
                "a leaf's params "
                "and optimizer state must be sharded alike (create the state "
                "with init(params), or with jit out_shardings equal to the "
                "params')"
            )
    if reference is not None:
        check_splits(reference_name, shape, reference)
        if operands.quantizes:
            check_blocks(reference_name, shape, reference, operands.block)
    return reference


def check_blocks(name: str, shape: tuple[int, ...], sharding: Any, block: int):
    """Raises unless each shard of a quantized leaf holds whole quantization
    blocks: its last dim, where split, in multiples of `block`, so that each
    device's scales are its own and the blocks are the unsharded leaf's."""
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) < len(shape):
        return
    axes = _axes(tuple(sharding.spec)[len(shape) - 1])
    ways = math.prod(dict(sharding.mesh.shape)[axis] for axis in axes)
    if ways > 1 and (shape[-1] // ways) % block:
        raise ValueError(
            f"{name} has shape {shape} and 8-bit state in blocks of {block}, "
            f"but {_describe(sharding, len(shape))} splits its last dim into "
            f"shards of {shape[-1] // ways}, which cuts a quantization block: "
            f"shard the last dim in multiples of {block}, or shard another dim"
        )


def check_splits(name: str, shape: tuple[int, ...], sharding: Any) -> None:
    """Raises unless `sharding` splits every dim of `shape` into equal shards."""
    if not isinstance(sharding, NamedSharding):
        return
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        raise ValueError(
            f"{name} has shape {shape} but is sharded as {sharding.spec}, "
            f"which names {len(spec)} dims"
        )
    mesh_sizes = dict(sharding.mesh.shape)
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=False)):
        axes = _axes(axes)
        ways = math.prod(mesh_sizes[axis] for axis in axes)
        if size % ways:
            raise ValueError(
                f"{name} has shape {shape}; its dim {dim} ({size}) cannot be "
                f"split over mesh axes {axes} ({ways} shards, "
                f"{_describe(sharding, len(shape))}): every dim must be a multiple of the "
                "product of the mesh axes it is sharded over"
            )


def _explicit_axes(mesh) -> tuple[str, ...]:
    """The mesh's Explicit axes; raises if it mixes them with Auto ones."""
    explicit_axes = tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    )
    if explicit_axes and any(kind == AxisType.Auto for kind in mesh.axis_types):
        raise ValueError(
            f"the mesh {mesh} mixes Explicit and Auto axes; the AMSGrad step "
            "runs per shard under a mesh whose axes are all Explicit (or "
            "Manual) or all Auto"
        )
    return explicit_axes


def _in_shard_map(group: _Group, mesh, explicit_axes, coefficients, leaves, keys):
    """Explicit axes: shardings are in the types, so check them and shard_map."""
    in_specs, out_specs, specs = [], [], []
    for index, (path, leaf) in enumerate(zip(group.paths, leaves, strict=True)):
        shardings = [jax.typeof(x).sharding for x in leaf]
        reference = check_leaf(path, group.operands, leaf[0].shape, shardings)
        spec = reference.spec
        grads_index = group.operands.grad_index
        if not _same_layout(shardings[grads_index], reference, leaf[0].ndim):
            leaf = list(leaf)
            leaf[grads_index] = jax.sharding.reshard(leaf[grads_index], spec)
            leaves[index] = tuple(leaf)
        in_specs.append((spec,) * len(leaf))
        out_specs.append((spec,) * len(group.out_dtypes))
        specs.append(spec)
    layout = _ShardLayout(
        tuple(leaf[0].shape for leaf in leaves),
        tuple(specs),
        tuple(dict(mesh.shape).items()),
    )
    return jax.shard_map(
        functools.partial(group.run, layout=layout),
        mesh=mesh,
        in_specs=(PartitionSpec(), in_specs, PartitionSpec()),
        out_specs=out_specs,
        axis_names=set(explicit_axes),
        # pallas_call declares no per-axis variance of its outputs.
        check_vma=False,
    )(coefficients, leaves, keys)


def _run_group(coefficients, leaves, keys, group: _Group):
    return group.run(coefficients, leaves, keys)


_partitioned_group = custom_partitioning(_run_group, static_argnums=(3,))


def _leaf_shardings(group: _Group, arg_shapes):
    """Checks each leaf's operands' shardings; returns the reference ones."""
    _, leaves, _ = arg_shapes
    references = []
    for path, leaf in zip(group.paths, leaves, strict=True):
        shardings = [x.sharding for x in leaf]
        references.append(check_leaf(path, group.operands, leaf[0].shape, shardings))
    return references


def _partition(group: _Group, mesh, arg_shapes, result_shape):
    del result_shape
    references = _leaf_shardings(group, arg_shapes)
    _, leaves, _ = arg_shapes
    replicated = NamedSharding(mesh, PartitionSpec())
    arg_shardings = (
        replicated,
        [
            (reference,) * len(leaf)
            for reference, leaf in zip(references, leaves, strict=True)
        ],
        replicated,
    )
    result_shardings = [
        (reference,) * len(group.out_dtypes) for reference in references
    ]
    layout = _ShardLayout(
        tuple(leaf[0].shape for leaf in leaves),
        tuple(r.spec if isinstance(r, NamedSharding) else None for r in references),
        tuple(dict(mesh.shape).items()),
    )
    run = functools.partial(group.run, layout=layout)
    return mesh, _without_refs(run), result_shardings, arg_shardings


def _without_refs(fn):
    """`fn` with the refs it creates inside (the GPU kernel's in-place
    operands) discharged into values, as jit does at its top level: the
    partitioner refuses to lower a jaxpr with their effect, and jit cannot
    discharge them inside a custom_jvp."""

    def discharged(*args):
        closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        if closed.effects:
            closed = discharge_state(closed)
        outputs = jax.extend.core.jaxpr_as_fun(closed)(*jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shapes), outputs)

    return discharged


def _sharding_rule(group: _Group, mesh, operand_types, result_types):
    """Shardy's rule: each leaf's dims are one set of factors for all of its
    operands and results; the coefficients are replicated."""
    del mesh
    operands, results = [("coefficients",)], []
    operand_count = len(group.operands.inputs)
    for leaf_index in range(len(group.paths)):
        # Operand 0 is the coefficients; then each leaf's operands in turn.
        rank = len(operand_types[1 + leaf_index * operand_count].shape)
        dims = tuple(f"leaf{leaf_index}_dim{d}" for d in range(rank))
        # A quantized moment's scales: one per block of the last dim.
        blocks = (*dims[:-1], f"leaf{leaf_index}_blocks")

        def factors(name, dims=dims, blocks=blocks):
            return blocks if name.endswith("_scales") else dims

        operands += [factors(name) for name in group.operands.inputs]
        results += [factors(name) for name in group.operands.outputs]
    operands.append(("key_leaves", "key_outputs"))
    assert len(results) == len(result_types)
    return SdyShardingRule(
        tuple(operands),
        tuple(results),
        need_replication_factors=("coefficients", "key_leaves", "key_outputs"),
    )


_partitioned_group.def_partition(_partition, sharding_rule=_sharding_rule)


def sum_per_shard(
    leaf_sum: Callable[[jax.Array], jax.Array], leaves: Sequence[jax.Array]
) -> jax.Array:
    """The sum over `leaves` of `leaf_sum(leaf)` (a scalar in at least
    float32), with one all-reduce on a mesh.

    Each device sums its own shards; a leaf replicated over a mesh axis is
    counted only by the devices at index 0 of that axis. The devices' partial
    sums then meet in a single all-reduce over every mesh axis, where XLA's
    partitioner would reduce each leaf over its own axes (one all-reduce per
    set of axes the leaves are split over).

    Args:
      leaf_sum: maps an array (a leaf or its shard) to a scalar; a
        module-level function (it is a static argument of the partitioned op).
      leaves: the arrays, sharded in any way.
    """
    leaves = tuple(leaves)
    if jax.device_count() == 1 or not leaves:
        return _run_sum(leaves, leaf_sum)
    return _sum_with_xla_derivatives(leaf_sum, leaves)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _sum_with_xla_derivatives(leaf_sum, leaves):
    """The sum per shard, differentiated as the sum on whole arrays (neither
    custom_partitioning nor an unchecked shard_map has a JVP)."""
    mesh = jax.sharding.get_abstract_mesh()
    explicit_axes = _explicit_axes(mesh)
    if explicit_axes:
        specs = tuple(jax.typeof(x).sharding.spec for x in leaves)
        return jax.shard_map(
            functools.partial(
                _local_sum, leaf_sum, specs=specs, axis_names=explicit_axes
            ),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=PartitionSpec(),
            axis_names=set(explicit_axes),
            check_vma=False,
        )(leaves)
    return _partitioned_sum(leaves, leaf_sum)


@_sum_with_xla_derivatives.defjvp
def _sum_jvp(leaf_sum, primals, tangents):
    (leaves,), (leaf_tangents,) = primals, tangents
    _, total_tangent = jax.jvp(
        functools.partial(_run_sum, leaf_sum=leaf_sum), (leaves,), (leaf_tangents,)
    )
    return _sum_with_xla_derivatives(leaf_sum, leaves), total_tangent


def _local_sum(leaf_sum, leaves, specs, axis_names):
    """This device's share of the sum; all-reduced over `axis_names`."""
    total = jnp.zeros([], jnp.float32)
    for leaf, spec in zip(leaves, specs, strict=True):
        partial = leaf_sum(leaf)
        split = set() if spec is None else {a for e in spec for a in _axes(e)}
        for axis in axis_names:
            if axis not in split:  # Replicated: one copy counts.
                partial = jnp.where(jax.lax.axis_index(axis) == 0, partial, 0)
        total = total + partial
    return jax.lax.psum(total, tuple(axis_names)) if axis_names else total


def _run_sum(leaves, leaf_sum):
    """The whole sum on one device (no mesh axes)."""
    return _local_sum(leaf_sum, leaves, (None,) * len(leaves), ())


_partitioned_sum = custom_partitioning(_run_sum, static_argnums=(1,))


def _partition_sum(leaf_sum, mesh, arg_shapes, result_shape):
    del result_shape
    (leaves,) = arg_shapes
    shardings = [
        x.sharding
        if isinstance(x.sharding, NamedSharding)
        else NamedSharding(mesh, PartitionSpec())
        for x in leaves
    ]
    specs = [sharding.spec for sharding in shardings]
    lower = functools.partial(
        _local_sum, leaf_sum, specs=specs, axis_names=mesh.axis_names
    )
    return (
        mesh,
        lower,
        NamedSharding(mesh, PartitionSpec()),
        (tuple(shardings),),
    )


def _sum_rule(leaf_sum, mesh, operand_types, result_types):
    """Shardy's rule: every leaf dim is summed over (a reduction factor)."""
    del leaf_sum, mesh, result_types
    operands = tuple(
        tuple(f"leaf{i}_dim{d}" for d in range(len(x.shape)))
        for i, x in enumerate(operand_types)
    )
    return SdyShardingRule(operands, ((),))


_partitioned_sum.def_partition(_partition_sum, sharding_rule=_sum_rule)


def _concrete_named_sharding(x) -> NamedSharding | None:
    concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    if concrete and isinstance(x.sharding, NamedSharding):
        return x.sharding
    return None


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes one PartitionSpec entry names, as a tuple."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _same_layout(a, b, ndim: int) -> bool:
    """Whether two shardings split an ndim array the same way, same devices."""
    if isinstance(a, NamedSharding) and isinstance(b, NamedSharding):
        spec_a, spec_b = (
            tuple(_axes(e) for e in s.spec) + ((),) * (ndim - len(s.spec))
            for s in (a, b)
        )
        return spec_a == spec_b and a.mesh == b.mesh
    return a.is_equivalent_to(b, ndim)


def _describe(sharding, ndim: int) -> str:
    """e.g. "P('data', None) over mesh {'data': 8}", the spec spelt to ndim."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        spec = PartitionSpec(*spec, *(None,) * (ndim - len(spec)))
        return f"{spec} over mesh {dict(sharding.mesh.shape)}"
    return str(sharding)
