"""The step lowered for real TPU and GPU targets, from this CPU machine.

`jax.export(platforms=[...])` runs Mosaic TPU's and Mosaic GPU's own lowering
(Mosaic GPU also checks its shared-memory limit), so a kernel that would not
compile for a target fails here. The exported StableHLO is then inspected:
one Mosaic custom call per dtype group, every state and parameter operand
aliased to its output, and block sizes inside each target's on-chip memory.
"""

from __future__ import annotations

import itertools
import math
import re

import exporting
import jax
import pytest
import strategies
from jax._src.pallas import primitives
from jax._src.pallas.mosaic import lowering, tpu_info

import pallas_amsgrad
from pallas_amsgrad import _math
from pallas_amsgrad.kernels import common

CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}

# A scalar, a leaf under one row, an odd 3-D leaf, a ragged leaf, one of three
# rows, an empty one, and one large enough for many grid steps on either
# target (abstract: the export never allocates it).
SHAPES = {
    "scalar": (),
    "tiny": (7,),
    "odd": (3, 5, 7),
    "ragged": (129,),
    "three_rows": (3, 128),  # An odd row count: one element per GPU thread.
    "empty": (0, 4),
    "large": (3000, 1000),
}

DTYPE_GRID = list(
    itertools.product(
        ["float32", "bfloat16", "float16"], [None, "bfloat16", "float16", "float32"]
    )
)


def _export(
    platform, fn_name, dtype, mu_dtype, shapes=SHAPES, block_sizes=None, **options
):
    opt = pallas_amsgrad.amsgrad(
        1e-3,
        mu_dtype=mu_dtype,
        implementation="pallas",
        block_sizes=block_sizes,
        **options,
    )
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
    state = jax.eval_shape(opt.init, params)
    if fn_name == "step":
        fn, args = jax.jit(opt.step, donate_argnums=(1, 2)), (params, state, params)
    else:
        fn, args = jax.jit(opt.update, donate_argnums=1), (params, state)
    return exporting.export(fn, platform, *args)


def _lowering_semantics(fn_name, dtype, mu_dtype) -> set[str]:
    """The Mosaic GPU lowering semantics in the step's jaxpr (every platform's
    kernel is traced there)."""
    opt = pallas_amsgrad.amsgrad(1e-3, mu_dtype=mu_dtype, implementation="pallas")
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in SHAPES.items()}
    state = jax.eval_shape(opt.init, params)
    fn = opt.step if fn_name == "step" else opt.update
    jaxpr = str(jax.make_jaxpr(fn)(params, state, params))
    return set(re.findall(r"lowering_semantics=<LoweringSemantics\.(\w+)", jaxpr))


def _custom_calls(module: str, target: str) -> list[str]:
    return exporting.launches(module, target)


def _aliases(call: str) -> dict[int, int]:
    """{operand index: output index} of a custom call's output_operand_aliases."""
    pairs = re.findall(r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)", call)
    return {int(operand): int(output) for output, operand in pairs}


def _expected_aliased_operands(fn_name, leaves):
    """Operands: 0 the coefficients, then each leaf's inputs in `_math`'s
    order. Everything but grad is written back in place; the update of
    `update` is a new array (grad is only read)."""
    operands = _math.STEP if fn_name == "step" else _math.UPDATE
    inputs = operands.inputs
    written = [inputs.index(name) for name in inputs if name != "grad"]
    return {1 + len(inputs) * k + i for k in range(leaves) for i in written}


@pytest.mark.parametrize("fn_name", ["step", "update"])
@pytest.mark.parametrize(
    "dtype, mu_dtype", DTYPE_GRID, ids=[f"{p}-mu={m}" for p, m in DTYPE_GRID]
)
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_with_every_state_array_aliased(platform, dtype, mu_dtype, fn_name):
    """One kernel for the whole tree on TPU (its leaves share dtypes), one per
    leaf on cuda, with every written array in place; on cuda, asking for
    Mosaic GPU's Lane semantics, which its per-thread loads are written for
    (jax 0.11 defaults to Warpgroup)."""
    module = _export(platform, fn_name, dtype, mu_dtype)
    if platform == "cuda":
        assert _lowering_semantics(fn_name, dtype, mu_dtype) == {"Lane"}
    calls = _custom_calls(module, CUSTOM_CALLS[platform])
    non_empty = len([s for s in SHAPES.values() if math.prod(s)])
    leaves_per_call = {"tpu": non_empty, "cuda": 1}[platform]
    assert len(calls) == non_empty // leaves_per_call
    for call in calls:
        # Four results per leaf, each written array's own buffer: no extra ones.
        assert int(re.match(r"\s*%\w+:(\d+) = ", call)[1]) == 4 * leaves_per_call
        aliases = _aliases(call)
        expected = _expected_aliased_operands(fn_name, leaves_per_call)
        assert set(aliases) == expected, call[:3000]
        assert len(set(aliases.values())) == len(aliases)  # Each to its own output.


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_default_block_sizes_fit_on_chip_memory(platform):
    """For every dtype mix the kernel takes (9 arrays, each 16 or 32 bits)."""
    limit = {"tpu": common.TPU_VMEM_BYTES, "cuda": common.GPU_SMEM_BYTES}[platform]
    block_rows = common.BlockSizes.get_default(platform).block_rows
    for dtypes in itertools.product(["float32", "bfloat16"], repeat=9):
        assert common.on_chip_bytes(block_rows, dtypes, platform) <= limit


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_block_sizes_over_on_chip_memory_raise_at_trace_time(platform):
    too_many_rows = {"tpu": 8192, "cuda": 128}[platform]
    with pytest.raises(
        ValueError, match=rf"needs \d+ bytes of on-chip memory on {platform}"
    ):
        _export(
            platform,
            "step",
            "float32",
            None,
            shapes={"w": (too_many_rows * 4, 128)},
            block_sizes=pallas_amsgrad.BlockSizes(too_many_rows),
        )


def test_largest_gpu_block_within_our_limit_passes_mosaic_gpu():
    """Our shared-memory bound is not looser than Mosaic GPU's own check."""
    dtypes = ["float32"] * 9
    per_row = common.on_chip_bytes(1, dtypes, "cuda")
    rows = common.GPU_SMEM_BYTES // per_row // common.ROW_MULTIPLE * common.ROW_MULTIPLE
    _export(
        "cuda",
        "step",
        "float32",
        None,
        shapes={"w": (rows * 2, 128)},
        block_sizes=pallas_amsgrad.BlockSizes(rows),
    )


def test_edge_shapes_lower_for_both_targets():
    """Every edge shape of the property tests, alone, for both targets."""
    shapes = {f"leaf{i}": s for i, s in enumerate(strategies.EDGE_SHAPES)}
    for platform in CUSTOM_CALLS:
        module = _export(platform, "step", "bfloat16", "float32", shapes=shapes)
        non_empty = len([s for s in shapes.values() if math.prod(s)])
        launches = {"tpu": 1, "cuda": non_empty}[platform]
        assert len(_custom_calls(module, CUSTOM_CALLS[platform])) == launches


def test_float64_runs_the_interpreter_on_every_target():
    """No Mosaic kernel takes float64: such leaves lower to plain HLO."""
    with jax.enable_x64(True):
        for platform, target in CUSTOM_CALLS.items():
            module = _export(platform, "step", "float64", None, shapes={"w": (8, 128)})
            assert not _custom_calls(module, target), platform


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_under_x64(platform):
    """With 64-bit types enabled, float32 and bfloat16 leaves still run in
    the Mosaic kernels, whose indices stay 32-bit (Mosaic TPU slices by
    i32; a Python int is i64 there): float32 state, 16-bit moments and
    8-bit state rounded stochastically, rows with tails."""
    shapes = {"w": (64, 512), "h": (40, 300), "b": (7,)}
    cases = [
        ("float32", None, dict()),
        ("bfloat16", "bfloat16", dict(nu_dtype="float16", stochastic_rounding=True)),
        ("bfloat16", "int8", dict(nu_dtype="uint8", stochastic_rounding=True)),
    ]
    with jax.enable_x64(True):
        for dtype, mu_dtype, options in cases:
            module = _export(platform, "step", dtype, mu_dtype, shapes, **options)
            assert _custom_calls(module, CUSTOM_CALLS[platform]), (mu_dtype, options)


def test_tpu_export_names_the_tpu_that_jax_0_11_2_lowering_reads(monkeypatch):
    """jax 0.11.2's Mosaic TPU lowers `pl.run_scoped` after reading the
    TPU's kind (`tpu_info.get_tpu_info`), which fails on a host without
    TPUs unless an abstract mesh names one. Emulated here on the installed
    jax: the bare export fails so, and `exporting.export`, which the suite's
    TPU exports use, lowers every launch."""
    for rules in lowering.lowering_rules.values():
        if primitives.run_scoped_p in rules:
            rule = rules[primitives.run_scoped_p]

            def reads_the_tpu(*args, rule=rule, **kwargs):
                tpu_info.get_tpu_info()
                return rule(*args, **kwargs)

            monkeypatch.setitem(rules, primitives.run_scoped_p, reads_the_tpu)
    opt = pallas_amsgrad.amsgrad(1e-3, implementation="pallas")
    params = [jax.ShapeDtypeStruct((8, 128), "float32")] * 2
    args = (params, jax.eval_shape(opt.init, params), params)
    step = jax.jit(opt.step)
    with pytest.raises(ValueError, match="Unsupported TPU device kind: cpu"):
        jax.export.export(step, platforms=["tpu"])(*args)
    assert (
        len(_custom_calls(exporting.export(step, "tpu", *args), "tpu_custom_call")) == 1
    )


def test_gpu_kernels_of_leaves_alike_are_lowered_and_compiled_once():
    """A launch per leaf, but each distinct (shape, dtypes) traced and
    lowered once, and one Mosaic GPU module (kernel hash) per distinct leaf,
    which Mosaic GPU compiles once: a step's compile time grows with a
    model's distinct leaves, not its leaves."""
    shapes = [(8, 128)] * 6 + [(16, 128)] * 3 + [(300,)]
    params = [jax.ShapeDtypeStruct(s, "float32") for s in shapes]
    opt = pallas_amsgrad.amsgrad(1e-3, implementation="pallas")
    module = exporting.export(
        jax.jit(opt.step), "cuda", params, jax.eval_shape(opt.init, params), params
    )
    launched = _custom_calls(module, CUSTOM_CALLS["cuda"])
    assert len(launched) == len(shapes)
    assert len(set(re.findall(r'kernel_hash = "([^"]*)"', module))) == 3
    assert module.count("@mosaic_gpu_v2(") == 3  # Lowered once each.
