"""Bad input: clear errors naming the leaf and the value, at trace time."""

from __future__ import annotations

import exporting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_amsgrad


@pytest.fixture
def opt(implementation):
    return pallas_amsgrad.amsgrad(0.1, implementation=implementation)


def params():
    return {"layer": {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}}


def test_mismatched_grad_shape_names_the_leaf(opt):
    state = opt.init(params())
    grads = {"layer": {"w": jnp.ones((4, 3)), "b": jnp.zeros(4)}}
    with pytest.raises(
        ValueError,
        match=r"state\.mu\['layer'\]\['b'\] has shape \(3,\) but the gradient has shape \(4,\)",
    ):
        jax.jit(opt.update).trace(grads, state)


@pytest.mark.parametrize("moment", ["mu", "nu", "nu_max"])
def test_mismatched_moment_names_the_moment(opt, moment):
    amsgrad_state, *rest = opt.init(params())
    bad = {"layer": {"w": jnp.ones((4, 3)), "b": jnp.zeros(2)}}
    state = (amsgrad_state._replace(**{moment: bad}), *rest)
    with pytest.raises(
        ValueError,
        match=rf"state\.{moment}\['layer'\]\['b'\] has shape \(2,\) but the gradient",
    ):
        jax.jit(opt.update).trace(params(), state)


def test_mismatched_tree_structure(opt):
    state = opt.init(params())
    grads = {"layer": {"w": jnp.ones((4, 3))}}
    with pytest.raises(
        ValueError, match=r"state\.mu does not have the structure of the gradients"
    ):
        opt.update(grads, state)


def test_mismatched_params_in_step(opt):
    state = opt.init(params())
    bad_params = {"layer": {"w": jnp.ones((4, 3)), "b": jnp.zeros(5)}}
    with pytest.raises(ValueError, match=r"params\['layer'\]\['b'\] has shape \(5,\)"):
        opt.step(params(), state, bad_params)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_], ids=str)
def test_non_float_gradient_leaf(opt, dtype):
    state = opt.init(params())
    grads = {"layer": {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros(3)}}
    with pytest.raises(
        TypeError, match=rf"grads\['layer'\]\['w'\] has dtype {jnp.dtype(dtype).name}"
    ):
        opt.update(grads, state)


def test_integer_param_leaf(opt):
    int_params = {"layer": {"w": jnp.ones((4, 3), jnp.int32), "b": jnp.zeros(3)}}
    state = opt.init(params())
    with pytest.raises(TypeError, match=r"params\['layer'\]\['w'\] has dtype int32"):
        opt.step(params(), state, int_params)


@pytest.mark.parametrize(
    "mu_dtype", [jnp.uint8, jnp.int16, "not-a-dtype", jnp.complex64], ids=str
)
def test_mu_dtype_must_be_float_or_int8(mu_dtype):
    with pytest.raises(TypeError, match="mu_dtype="):
        pallas_amsgrad.amsgrad(0.1, mu_dtype=mu_dtype)


@pytest.mark.parametrize(
    "learning_rate", ["0.1", np.ones(3, np.float32), None, True], ids=repr
)
def test_learning_rate_scalar_or_callable(learning_rate):
    with pytest.raises(TypeError, match="learning_rate"):
        pallas_amsgrad.amsgrad(learning_rate)


def test_unknown_implementation():
    with pytest.raises(ValueError, match=r"implementation='triton' is not one of"):
        pallas_amsgrad.amsgrad(0.1, implementation="triton")
    with pytest.raises(TypeError, match=r"implementation=<object .*> is not one of"):
        pallas_amsgrad.amsgrad(0.1, implementation=object())


def test_block_sizes_beside_an_implementation_object():
    with pytest.raises(ValueError, match=r"set it on the object"):
        pallas_amsgrad.amsgrad(
            0.1,
            implementation=pallas_amsgrad.Pallas(),
            block_sizes=pallas_amsgrad.BlockSizes(16),
        )
    with pytest.raises(TypeError, match=r"block_sizes=32 must be a BlockSizes"):
        pallas_amsgrad.Pallas(block_sizes=32)
    with pytest.raises(TypeError, match=r"block_sizes=32 must be a BlockSizes"):
        pallas_amsgrad.amsgrad(0.1, block_sizes=32)


def test_step_without_params_is_refused_at_trace_time(opt):
    """`update` takes params=None; `step` would return the updates as if they
    were the new params."""
    state = opt.init(params())
    with pytest.raises(TypeError, match=r"params=None; pass the params"):
        jax.jit(opt.step).trace(params(), state, None)


@pytest.mark.parametrize("name", ["b1", "b2", "eps", "eps_root"])
def test_hyperparameters_must_be_scalars(name):
    with pytest.raises(TypeError, match=name):
        pallas_amsgrad.amsgrad(0.1, **{name: jnp.ones(2)})


@pytest.mark.parametrize("block_rows", [0, -16, 8, 100, 16.0])
def test_block_sizes_validated(block_rows):
    with pytest.raises(
        ValueError, match=r"block_rows=.* must be a positive multiple of 16"
    ):
        pallas_amsgrad.BlockSizes(block_rows)


def test_block_too_big_for_gpu_shared_memory():
    opt = pallas_amsgrad.amsgrad(
        0.1, implementation="pallas", block_sizes=pallas_amsgrad.BlockSizes(1024)
    )
    # update: grad, mu, nu, nu_max in; update, mu, nu, nu_max out; float32:
    # 1024 rows x 128 lanes x 8 arrays x 4 bytes = 4194304 bytes, one buffer each.
    with pytest.raises(
        ValueError,
        match=r"needs 4194304 bytes of on-chip memory on cuda, more than its 232448",
    ):
        opt.update(params(), opt.init(params()))


def test_complex_leaf_with_a_real_mu_dtype():
    """A real mu_dtype would drop a complex leaf's imaginary part: refused in
    init and in update, naming the leaf."""
    opt = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.bfloat16)
    complex_params = {"c": jnp.ones(3, jnp.complex64), "r": jnp.ones(2)}
    with pytest.raises(
        TypeError, match=r"params\['c'\] is complex \(complex64\) but mu_dtype=bfloat16"
    ):
        opt.init(complex_params)
    state = opt.init({"c": jnp.ones(3), "r": jnp.ones(2)})
    with pytest.raises(
        TypeError, match=r"grads\['c'\] is complex \(complex64\) but mu_dtype=bfloat16"
    ):
        opt.update(complex_params, state)


def test_complex_first_moment_for_a_real_param():
    """A complex mu (a state of complex params) for real gradients and params
    would drop the update's imaginary part: refused, naming the moment."""
    opt = pallas_amsgrad.amsgrad(0.1)
    state = opt.init({"c": jnp.ones(3, jnp.complex64)})
    real = {"c": jnp.ones(3)}
    with pytest.raises(
        TypeError,
        match=r"state\.mu\['c'\] is complex \(complex64\) but params\['c'\] is real",
    ):
        opt.step(real, state, real)


@pytest.mark.parametrize(
    "nu_dtype", [jnp.int8, jnp.uint16, "not-a-dtype", jnp.complex64], ids=str
)
def test_nu_dtype_must_be_a_real_float_or_uint8(nu_dtype):
    with pytest.raises(TypeError, match="nu_dtype="):
        pallas_amsgrad.amsgrad(0.1, nu_dtype=nu_dtype)
    with pytest.raises(TypeError, match="nu_dtype="):
        pallas_amsgrad.scale_by_amsgrad(nu_dtype=nu_dtype)


def test_nu_dtype_wider_than_the_computation():
    """float64 storage for float32 params (computed in float32) would only
    pretend to more precision: refused in init and in update, naming the leaf."""
    with jax.enable_x64(True):
        opt = pallas_amsgrad.amsgrad(0.1, nu_dtype=jnp.float64)
        params = {"w": jnp.ones(3, jnp.float32), "d": jnp.ones(2, jnp.float64)}
        with pytest.raises(
            ValueError,
            match=r"nu_dtype=float64 is wider than params\['w'\]'s computation "
            r"\(float32\)",
        ):
            opt.init(params)
        state = pallas_amsgrad.amsgrad(0.1).init(params)
        with pytest.raises(ValueError, match=r"wider than grads\['w'\]'s"):
            opt.update(params, state)
        # float64 leaves compute in float64: there it is no wider.
        opt.init({"d": params["d"]})


def test_complex_leaf_with_nu_dtype():
    opt = pallas_amsgrad.amsgrad(0.1, nu_dtype=jnp.bfloat16)
    with pytest.raises(
        TypeError, match=r"params\['c'\] is complex \(complex64\) but nu_dtype=bfloat16"
    ):
        opt.init({"c": jnp.ones(3, jnp.complex64)})


def test_complex_gradient_for_a_real_param():
    opt = pallas_amsgrad.amsgrad(0.1)
    real_params = {"c": jnp.ones(3), "r": jnp.ones(2)}
    grads = {"c": jnp.ones(3, jnp.complex64), "r": jnp.ones(2)}
    state = opt.init({"c": jnp.ones(3, jnp.complex64), "r": jnp.ones(2)})
    with pytest.raises(
        TypeError,
        match=r"grads\['c'\] is complex \(complex64\) but params\['c'\] is real \(float32\)",
    ):
        opt.step(grads, state, real_params)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (
            {"weight_decay": -0.1},
            ValueError,
            r"weight_decay=-0\.1 must be non-negative",
        ),
        (
            {"weight_decay": np.ones(2, np.float32)},
            TypeError,
            r"weight_decay must be a scalar",
        ),
        ({"weight_decay": "0.1"}, TypeError, r"weight_decay='0\.1' must be a scalar"),
        ({"max_grad_norm": -1.0}, ValueError, r"max_grad_norm=-1\.0 must be positive"),
        ({"max_grad_norm": 0.0}, ValueError, r"max_grad_norm=0\.0 must be positive"),
        (
            {"max_grad_norm": np.ones(3, np.float32)},
            TypeError,
            r"max_grad_norm must be a scalar",
        ),
        (
            {"max_consecutive_errors": 0},
            ValueError,
            r"max_consecutive_errors=0 must be at least 1",
        ),
        (
            {"max_consecutive_errors": 2.5},
            TypeError,
            r"max_consecutive_errors=2\.5 must be an integer",
        ),
        (
            {"max_consecutive_errors": True},
            TypeError,
            r"max_consecutive_errors=True must be an integer",
        ),
        (
            {"weight_decay": 0.1, "mask": {"layer": "yes"}},
            TypeError,
            r"mask\['layer'\]='yes' must be a bool",
        ),
    ],
    ids=repr,
)
def test_recipe_options_validated(options, error, message):
    with pytest.raises(error, match=message):
        pallas_amsgrad.amsgrad(0.1, **options)


@pytest.mark.parametrize("callable_mask", [False, True], ids=["tree", "callable"])
def test_mask_must_be_a_prefix_of_the_params(callable_mask):
    mask = {"other": True}
    opt = pallas_amsgrad.amsgrad(
        0.1, weight_decay=0.1, mask=(lambda _: mask) if callable_mask else mask
    )
    with pytest.raises(ValueError, match=r"mask has the structure .* not a prefix"):
        opt.init(params())


def test_update_without_params_refused_when_decaying(implementation):
    opt = pallas_amsgrad.amsgrad(0.1, weight_decay=0.1, implementation=implementation)
    state = opt.init(params())
    with pytest.raises(
        ValueError, match=r"weight_decay=\.\.\.\) decays the params, but params=None"
    ):
        jax.jit(opt.update).trace(params(), state)


@pytest.mark.parametrize(
    "block", [100, 0, -256, 1.5, True, np.array(256), 64], ids=repr
)
def test_quantization_block_is_a_positive_multiple_of_128(block):
    with pytest.raises((TypeError, ValueError), match=r"quantization_block="):
        pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.int8, quantization_block=block)


def test_quantization_block_without_8_bit_state():
    with pytest.raises(ValueError, match=r"quantization_block=512 applies to 8-bit"):
        pallas_amsgrad.amsgrad(0.1, nu_dtype=jnp.bfloat16, quantization_block=512)


def test_8_bit_state_of_complex_and_float64_leaves():
    big = (16, 300)
    opt = pallas_amsgrad.amsgrad(0.1, nu_dtype=jnp.uint8)
    with pytest.raises(TypeError, match=r"params\['c'\] is complex .*nu_dtype=uint8"):
        opt.init({"c": jnp.ones(big, jnp.complex64)})
    with (
        jax.enable_x64(True),
        pytest.raises(TypeError, match=r"params\['d'\] is float64: 8-bit state"),
    ):
        opt.init({"d": jnp.ones(big, jnp.float64)})


def test_state_of_another_storage_names_the_leaf(implementation):
    """A float state given to an 8-bit optimizer (or the reverse, or other
    blocks) is refused, naming the leaf and the way to convert it."""
    params = {"w": jnp.ones((16, 300)), "b": jnp.ones(3)}
    eight_bit = pallas_amsgrad.amsgrad(
        0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, implementation=implementation
    )
    plain = pallas_amsgrad.amsgrad(0.1, implementation=implementation)
    with pytest.raises(
        ValueError, match=r"state.mu\['w'\] is an array of float32.*convert_state"
    ):
        eight_bit.step(params, plain.init(params), params)
    with pytest.raises(
        ValueError, match=r"state.mu\['w'\] is quantized \(int8 codes\)"
    ):
        plain.step(params, eight_bit.init(params), params)
    other_blocks = pallas_amsgrad.amsgrad(
        0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, quantization_block=128
    )
    with pytest.raises(
        ValueError, match=r"state.mu\['w'\] is quantized in blocks of 256"
    ):
        other_blocks.step(params, eight_bit.init(params), params)


def test_pallas_exports_8_bit_state_for_both_platforms():
    """`Pallas()` lowers 8-bit state for TPU and for GPU: rows of whole
    quantization blocks and rows that end in a shorter one."""
    params = {
        "w": jax.ShapeDtypeStruct((16, 300), jnp.float32),
        "v": jax.ShapeDtypeStruct((16, 256), jnp.bfloat16),
    }
    opt = pallas_amsgrad.amsgrad(
        0.1,
        mu_dtype=jnp.int8,
        nu_dtype=jnp.uint8,
        implementation=pallas_amsgrad.Pallas(),
    )
    state = jax.eval_shape(opt.init, params)
    for platform in ("tpu", "cuda"):
        exporting.export(jax.jit(opt.step), platform, params, state, params)


@pytest.mark.parametrize(
    "implementation",
    ["pallas", pallas_amsgrad.Pallas(platforms=("cuda",))],
    ids=["any-platform", "cuda"],
)
def test_gpu_kernel_refuses_8_bit_rows_too_long_to_take_whole(implementation):
    """The GPU kernel takes rows that end in a shorter quantization block
    whole, so not rows longer than its shared memory holds: `Pallas()`,
    which also lowers for GPU, and `Pallas(platforms=("cuda",))` name the
    leaf and what runs it."""
    params = {"w": jax.ShapeDtypeStruct((16, 50000), jnp.float32)}
    opt = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.int8, implementation=implementation)
    state = jax.eval_shape(opt.init, params)
    with pytest.raises(
        NotImplementedError,
        match=r"cuda kernel .* leaf of shape \(16, 50000\).*implementation='xla' or None",
    ):
        jax.eval_shape(opt.step, params, state, params)


def test_convert_state_needs_an_amsgrad_state():
    with pytest.raises(ValueError, match=r"no optax.ScaleByAmsgradState"):
        pallas_amsgrad.convert_state((), {"w": jnp.ones(3)}, mu_dtype=jnp.int8)
