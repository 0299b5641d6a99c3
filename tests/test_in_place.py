"""The step moves the minimum bytes, in place: launches, copies and traffic.

Inspects programs, never timings: the StableHLO exported for TPU and GPU (the
kernel's declared traffic, the ops around it, the jit's buffer aliasing) and
the program XLA:CPU compiles for the XLA path. The jitted function is a
training step's shape, `(params, state, grads) -> (params, state)` with params
and state donated: jax pairs donated inputs with outputs of the same shape and
dtype in order, so this order gives every buffer back to its own array (see
docs/design-and-kernels.md, "Updating in place").
"""

from __future__ import annotations

import math
import re

import exporting
import jax
import jax.numpy as jnp
import pytest

import pallas_amsgrad

CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}
# Lane-aligned leaves of a transformer block and its embedding: each a whole
# number of 128-lane rows, so no leaf needs padding.
SHAPES = {
    "embed": (1000, 256),
    "qkv": (256, 768),
    "out": (256, 256),
    "mlp_up": (256, 1024),
    "mlp_up_bias": (1024,),
    "norm": (256,),
    "heads": (4, 64, 256),  # Merged to (256, 256) for TPU, tiles unchanged.
}
PARAMETERS = sum(math.prod(s) for s in SHAPES.values())


def _train_step(opt):
    def train_step(params, state, grads):
        return opt.step(grads, state, params)

    return jax.jit(train_step, donate_argnums=(0, 1))


def _abstract(dtype, mu_dtype, implementation="pallas", **options):
    opt = pallas_amsgrad.amsgrad(
        1e-3, mu_dtype=mu_dtype, implementation=implementation, **options
    )
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in SHAPES.items()}
    return opt, params, jax.eval_shape(opt.init, params)


def _export(platform, dtype, mu_dtype, **options):
    opt, params, state = _abstract(dtype, mu_dtype, **options)
    return exporting.export(_train_step(opt), platform, params, state, params)


def _custom_calls(module, platform):
    return exporting.launches(module, CUSTOM_CALLS[platform])


# Minimum bytes per parameter of a fused step (docs/bench.md's table): read
# param, grad, mu, nu, nu_max and write param, mu, nu, nu_max, each once.
MINIMUM_BYTES = [
    ("float32", None, None, 36),  # 9 float32 arrays.
    ("bfloat16", None, None, 18),  # 9 bfloat16 arrays.
    ("float32", "bfloat16", None, 32),  # 7 float32 arrays, mu in bfloat16.
    ("float32", None, "bfloat16", 28),  # 5 float32 arrays, nu, nu_max in bf16.
    ("float32", "bfloat16", "bfloat16", 24),  # 3 float32 arrays, 6 bfloat16.
]
BYTES_IDS = [f"{d}-mu={m}-nu={n}" for d, m, n, _ in MINIMUM_BYTES]


@pytest.mark.parametrize(
    "dtype, mu_dtype, nu_dtype, expected", MINIMUM_BYTES, ids=BYTES_IDS
)
def test_tpu_kernel_declares_the_minimum_bytes_per_parameter(
    dtype, mu_dtype, nu_dtype, expected
):
    """The kernel's cost estimate, which its BlockSpecs realise: each array is
    streamed through VMEM once, every grid step reading and writing one block."""
    module = _export("tpu", dtype, mu_dtype, nu_dtype=nu_dtype)
    declared = [int(b) for b in re.findall(r"bytes_accessed\\+22:(\d+)", module)]
    assert sum(declared) == expected * PARAMETERS, (declared, PARAMETERS)


MLIR_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def _tensor_bytes(types: str) -> list[int]:
    """The size in bytes of each `tensor<AxBxdtype>` in a type list."""
    return [
        math.prod(int(d) for d in dims.split("x"))
        * jnp.dtype(MLIR_DTYPES[dtype]).itemsize
        for dims, dtype in re.findall(r"tensor<([\dx]+)x(\w+)>", types)
    ]


@pytest.mark.parametrize(
    "dtype, mu_dtype, nu_dtype, expected", MINIMUM_BYTES, ids=BYTES_IDS
)
def test_gpu_kernels_take_the_minimum_bytes_per_parameter(
    dtype, mu_dtype, nu_dtype, expected
):
    """Each GPU launch reads its operands and writes its results once (one TMA
    copy per block each way): their sizes, the coefficients aside, add up to
    the minimum."""
    module = _export("cuda", dtype, mu_dtype, nu_dtype=nu_dtype)
    total = 0
    for line in _custom_calls(module, "cuda"):
        inputs, outputs = re.search(r": \((.*)\) -> \((.*)\) loc", line).groups()
        coefficients, *operands = _tensor_bytes(inputs)
        assert coefficients < 64, inputs
        total += sum(operands) + sum(_tensor_bytes(outputs))
    assert total == expected * PARAMETERS, (total, PARAMETERS)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize(
    "dtype, mu_dtype, nu_dtype", [row[:3] for row in MINIMUM_BYTES], ids=BYTES_IDS
)
def test_no_parameter_sized_copies_around_the_kernel(
    platform, dtype, mu_dtype, nu_dtype
):
    module = _export(platform, dtype, mu_dtype, nu_dtype=nu_dtype)
    # One dtype group: one launch on TPU, a launch per leaf on GPU.
    launches = {"tpu": 1, "cuda": len(SHAPES)}[platform]
    assert len(_custom_calls(module, platform)) == launches
    # Only the per-step scalars (the 9 coefficients) are ever concatenated;
    # nothing is padded, sliced into or out of a larger buffer.
    for op in ("pad", "dynamic_update_slice", "slice", "gather", "scatter"):
        assert f"stablehlo.{op} " not in module, op
    for line in module.splitlines():
        if "stablehlo.concatenate" in line:
            assert re.search(r"-> tensor<\d+xf32>", line), line
    # Every donated param and moment is written back into its own buffer:
    # argument i (params, then count, mu, nu, nu_max) is result i.
    main = next(
        line for line in module.splitlines() if "func.func public @main" in line
    )
    aliases = [int(i) for i in re.findall(r"tf\.aliasing_output = (\d+)", main)]
    assert aliases == list(range(4 * len(SHAPES) + 1)), aliases


# The AdamW-style recipe: clipping, decay of the matrices only, skips.
RECIPE = dict(
    weight_decay=0.1,
    mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
    max_grad_norm=1.0,
    max_consecutive_errors=3,
)
# Its minimum: the fused pass (36 bytes per float32 parameter), after one
# read of the gradients for their norm and finiteness (4 bytes).
RECIPE_KERNEL_BYTES = 36


def _parameter_sized_reduces(module):
    """(nesting depth, combiner) of each reduce whose operand has a leaf's
    shape: depth 0 is the program itself, deeper is inside a branch."""
    pattern = r"^( *)%\S+ = stablehlo\.reduce\(.*applies stablehlo\.(\w+) .*: \(tensor<([\dx]+)x\w+>"
    leaf_shapes = {"x".join(map(str, s)) for s in SHAPES.values()}
    return [
        ((len(indent) - 4) // 2, combiner)
        for indent, combiner, dims in re.findall(pattern, module, re.MULTILINE)
        if dims in leaf_shapes
    ]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_recipe_reads_the_gradients_once_then_runs_the_fused_pass(platform):
    """Clipping, masked decay and skips add one read of the gradients (the
    norm and the finiteness flag from one sum per leaf) and nothing else:
    the kernel's traffic is the plain step's, everything in place. Only a
    non-finite (or overflowing) sum reads them again, inside the branch that
    tells the two apart."""
    module = _export(platform, "float32", None, **RECIPE)
    # On TPU two groups, the decayed matrices and the undecayed vectors; on
    # GPU a launch per leaf.
    launches = {"tpu": 2, "cuda": len(SHAPES)}[platform]
    assert len(_custom_calls(module, platform)) == launches
    if platform == "tpu":
        declared = [int(b) for b in re.findall(r"bytes_accessed\\+22:(\d+)", module)]
        assert sum(declared) == RECIPE_KERNEL_BYTES * PARAMETERS, declared
    reduces = _parameter_sized_reduces(module)
    assert sorted(c for depth, c in reduces if depth == 0) == ["add"] * len(SHAPES)
    assert all(c == "and" for depth, c in reduces if depth > 0), reduces
    for op in ("pad", "dynamic_update_slice", "slice", "gather", "scatter"):
        assert f"stablehlo.{op} " not in module, op
    main = next(
        line for line in module.splitlines() if "func.func public @main" in line
    )
    # Every parameter-sized buffer (params, mu, nu, nu_max) is written back
    # into a result of its shape, each into its own (jit prunes the unused
    # input last_finite, so indices shift; scalars may take new buffers).
    arguments, results = main.split(") -> (")
    tensor = r"tensor<((?:\d+x)*)[a-z]\w*>"
    result_dims = [d.rstrip("x") for d in re.findall(tensor, results)]
    leaf_shapes = {"x".join(map(str, s)) for s in SHAPES.values()}
    aliased = [
        (dims.rstrip("x"), int(alias))
        for dims, alias in re.findall(
            tensor + r" \{tf\.aliasing_output = (\d+)", arguments
        )
    ]
    sized = [(dims, alias) for dims, alias in aliased if dims in leaf_shapes]
    assert len(sized) == 4 * len(SHAPES), aliased
    assert len({alias for _, alias in sized}) == len(sized)
    assert all(result_dims[alias] == dims for dims, alias in sized), sized


def _reshapes(module):
    """(operand dims, result dims) of every reshape in the module."""
    pattern = r"stablehlo\.reshape .*: \(tensor<([\dx]*)x\w+>\) -> tensor<([\dx]*)x\w+>"
    return [
        tuple(tuple(map(int, filter(None, dims.split("x")))) for dims in pair)
        for pair in re.findall(pattern, module)
    ]


def test_tpu_leaves_keep_their_tiled_dims():
    """TPU tiles an array's last two dims in HBM: the kernel sees each matrix
    with them unchanged (a reshape of them would be a relayout, a copy)."""
    module = _export("tpu", "float32", None)
    reshapes = _reshapes(module)
    assert reshapes, "no views found: the pattern is out of date"
    for before, after in reshapes:
        if min(len(before), len(after)) >= 2:  # Not a vector's (rows, 128) view.
            assert before[-2:] == after[-2:], (before, after)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_tpu_launches_a_kernel_per_dtype_group_gpu_per_leaf(platform):
    """bfloat16 and float32 leaves in one tree: on TPU a launch per distinct
    set of dtypes, each covering all its leaves; on GPU a launch per leaf."""
    opt = pallas_amsgrad.amsgrad(1e-3, implementation="pallas")
    bfloat16_leaves = ("mlp_up_bias", "norm")
    params = {
        k: jax.ShapeDtypeStruct(s, "bfloat16" if k in bfloat16_leaves else "float32")
        for k, s in SHAPES.items()
    }
    state = jax.eval_shape(opt.init, params)
    module = exporting.export(_train_step(opt), platform, params, state, params)
    calls = _custom_calls(module, platform)
    # Operands: the coefficients, then (param, grad, mu, nu, nu_max) per leaf.
    operands = sorted(
        len(re.search(rf"@{CUSTOM_CALLS[platform]}\(([^)]*)\)", call)[1].split(","))
        for call in calls
    )
    leaves = len(SHAPES)
    expected = {
        "tpu": [1 + 5 * 2, 1 + 5 * (leaves - 2)],
        "cuda": [1 + 5] * leaves,
    }[platform]
    assert operands == expected, operands


def test_gpu_launches_a_kernel_per_leaf_of_a_large_group():
    """Mosaic GPU compiles a kernel in time quadratic in its copies, so a
    dtype group of 20 leaves takes 20 launches on GPU, one on TPU."""
    opt = pallas_amsgrad.amsgrad(1e-3, implementation="pallas")
    params = [jax.ShapeDtypeStruct((8, 128), "float32")] * 20
    state = jax.eval_shape(opt.init, params)
    for platform, launches in (("cuda", 20), ("tpu", 1)):
        module = exporting.export(_train_step(opt), platform, params, state, params)
        assert len(_custom_calls(module, platform)) == launches, platform


def _compiled_copies(dtype, mu_dtype, **options):
    """Parameter-sized copies, concatenates and pads anywhere in the program
    XLA:CPU compiles for the XLA path (a skip's branches included)."""
    opt, params, state = _abstract(dtype, mu_dtype, implementation="xla", **options)
    text = _train_step(opt).lower(params, state, params).compile().as_text()
    shapes = {",".join(map(str, s)) for s in SHAPES.values()}
    return [
        shape
        for shape in re.findall(
            r"= \w+\[([\d,]*)\]\S* (?:copy|concatenate|pad)\(", text
        )
        if shape in shapes
    ]


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32])
def test_xla_path_compiles_in_place(mu_dtype):
    assert _compiled_copies(jnp.float32, mu_dtype) == []


def test_xla_path_compiles_the_recipe_in_place():
    """A skip is a branch, not a select between old and new moments, which
    XLA:CPU would copy before the step."""
    assert _compiled_copies(jnp.float32, None, **RECIPE) == []


@pytest.mark.xfail(
    strict=True,
    reason="XLA:CPU splits a 16-bit leaf's step into fusions that each re-read "
    "the old moments (the update needs them unrounded), and copies them so "
    "that the fusions writing the new moments may run first",
)
def test_xla_path_compiles_in_place_with_16_bit_state():
    assert _compiled_copies(jnp.bfloat16, None) == []
