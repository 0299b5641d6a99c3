"""The contenders of `pallas-amsgrad bench`: each builds a closure that runs
one optimizer step on a workload and blocks until its outputs are ready.

The roofline is a contender too: one streaming pass over as many bytes as a
fused step must read and write, at the device's copy speed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import pallas_amsgrad
from pallas_amsgrad import _implementations, _quantization
from pallas_amsgrad.kernels import common
from pallas_amsgrad.tools.workloads import Shapes

LEARNING_RATE = 1e-3
ROOFLINE = "roofline"
# What `roofline_pass` runs, recorded in results: ratios to rooflines of
# different kinds do not compare.
ROOFLINE_KIND = "copy"


def _state_bytes(state_dtype, dtype) -> float:
    """Bytes per parameter of one moment: its dtype's, or for 8-bit
    block-quantized state one code plus a float32 scale per block (a large
    leaf's; leaves under 4096 elements keep float32)."""
    state_dtype = jnp.dtype(state_dtype or dtype)
    if state_dtype in _quantization.QUANTIZED_DTYPES:
        return 1 + 4 / _quantization.QUANTIZATION_BLOCK
    return state_dtype.itemsize


def _read_dtype(state_dtype, dtype):
    """The dtype a moment is read as: 8-bit codes as float32."""
    state_dtype = jnp.dtype(state_dtype or dtype)
    if state_dtype in _quantization.QUANTIZED_DTYPES:
        return jnp.dtype(jnp.float32)
    return state_dtype


def min_bytes_per_param(
    dtype, mu_dtype, job: str, recipe: bool = False, nu_dtype=None
) -> float:
    """The least a `job` must read and write per parameter (nu and nu_max in
    `nu_dtype`, where given; 8-bit state as codes and scales).

    step: read param, grad, mu, nu, nu_max; write param, mu, nu, nu_max.
    update: read grad, mu, nu, nu_max; write update, mu, nu, nu_max.
    update+apply: update, then read param and update and write param again.
    With the recipe (clipping, decay, skips) the gradients are read once more
    for their norm first, and `update` reads the params for the decay.
    """
    if recipe:
        p = jnp.dtype(dtype).itemsize
        extra = p + (p if job == "update" else 0)
        return min_bytes_per_param(dtype, mu_dtype, job, nu_dtype=nu_dtype) + extra
    p = jnp.dtype(dtype).itemsize
    m = _state_bytes(mu_dtype, dtype)
    n = _state_bytes(nu_dtype, dtype)
    update_dtype = jnp.result_type(
        dtype, _read_dtype(mu_dtype, dtype), _read_dtype(nu_dtype, dtype)
    )
    u = jnp.dtype(update_dtype).itemsize
    moments = 2 * (m + 2 * n)  # mu, nu, nu_max read and written.
    if job == "step":
        return p + p + p + moments  # grad read, param read and written.
    if job == "update":
        return p + u + moments
    if job == "update+apply":
        return p + u + moments + p + u + p
    raise ValueError(f"unknown job {job!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    dtype: str = "float32"
    mu_dtype: str | None = None
    # The AdamW-style recipe: clipping, decay of matrices, non-finite skips.
    recipe: bool = False
    # nu and nu_max's storage in this package's step; optax and torch have no
    # such option and keep them in the param dtype.
    nu_dtype: str | None = None
    # This package's 16-bit stores rounded stochastically; optax and torch
    # round to nearest.
    stochastic_rounding: bool = False

    @property
    def optax_mu_dtype(self) -> str | None:
        """The mu_dtype of the optax and torch contenders: the same, except
        that for 8-bit state (which they do not have) their full-precision
        state, in the param dtype."""
        return None if self.mu_dtype == "int8" else self.mu_dtype

    def min_bytes_per_param(self, job: str) -> float:
        return min_bytes_per_param(
            self.dtype, self.mu_dtype, job, self.recipe, self.nu_dtype
        )


def _matrices(tree):
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


RECIPE = dict(
    weight_decay=0.1,
    mask=_matrices,
    max_grad_norm=1.0,
    max_consecutive_errors=5,
)


def optax_reference(config: Config) -> optax.GradientTransformation:
    """optax.amsgrad, or with the recipe the optax composition it fuses."""
    if not config.recipe:
        return optax.amsgrad(LEARNING_RATE, mu_dtype=config.optax_mu_dtype)
    inner = optax.chain(
        optax.clip_by_global_norm(RECIPE["max_grad_norm"]),
        optax.scale_by_amsgrad(mu_dtype=config.optax_mu_dtype),
        optax.add_decayed_weights(RECIPE["weight_decay"], RECIPE["mask"]),
        optax.scale_by_learning_rate(LEARNING_RATE),
    )
    return optax.apply_if_finite(inner, RECIPE["max_consecutive_errors"])


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    job: str  # What one call does: "step" or "update" (see min_bytes_per_param).
    build: Callable[[Shapes, Config], Callable[[], None]]


def _random_tree(shapes: Shapes, dtype, seed: int, scale: float):
    keys = jax.random.split(jax.random.key(seed), len(shapes))

    @jax.jit
    def make(keys):
        return {
            name: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
            for k, (name, shape) in zip(keys, shapes.items(), strict=True)
        }

    return make(keys)


def _inputs(shapes: Shapes, config: Config):
    params = _random_tree(shapes, config.dtype, 0, 0.02)
    grads = _random_tree(shapes, config.dtype, 1, 0.01)
    return params, grads


def _carry_step(fn, donate: bool, shapes, config, optimizer):
    """Runs `fn(grads, state, params) -> (params, state)`, feeding outputs back.

    The closure carries the step's `lower_s` and `compile_s`, timed apart.
    Jitted as a training step, `(params, state, grads) -> (params, state)`:
    jax pairs donated inputs with same-typed outputs in order, so this order
    gives each donated buffer back to its own array. `jit(fn,
    donate_argnums=(1, 2))` would pair state.mu with the new params, and XLA
    would copy to honour it.
    """
    params, grads = _inputs(shapes, config)
    state = jax.jit(optimizer.init)(params)

    def train_step(params, state, grads):
        return fn(grads, state, params)

    jitted = jax.jit(train_step, donate_argnums=(0, 1) if donate else ())
    compiled, seconds = _compile(jitted, params, state, grads)
    carry = [params, state]

    def run():
        carry[0], carry[1] = compiled(carry[0], carry[1], grads)
        jax.block_until_ready(carry)

    run.lower_s, run.compile_s = seconds
    return run


def _compile(jitted, *args):
    """`jitted` compiled for `args`, and the seconds its lowering and XLA's
    compile took."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, (lowered_at - start, time.perf_counter() - lowered_at)


def _ours(config, implementation=None):
    """This package's optimizer, with its default implementation here or the
    one named."""
    options = RECIPE if config.recipe else {}
    return pallas_amsgrad.amsgrad(
        LEARNING_RATE,
        mu_dtype=config.mu_dtype,
        nu_dtype=config.nu_dtype,
        stochastic_rounding=config.stochastic_rounding,
        implementation=implementation,
        **options,
    )


def _our_step(donate: bool, implementation=None):
    def build(shapes, config):
        opt = _ours(config, implementation)
        return _carry_step(opt.step, donate, shapes, config, opt)

    return build


def _our_update(shapes, config):
    opt = _ours(config)

    def update_only(state, grads, params):
        updates, state = opt.update(grads, state, params)
        return state, updates

    params, grads = _inputs(shapes, config)
    state = jax.jit(opt.init)(params)
    jitted = jax.jit(update_only, donate_argnums=0)
    compiled, seconds = _compile(jitted, state, grads, params)
    carry = [state]

    def run():
        carry[0], updates = compiled(carry[0], grads, params)
        jax.block_until_ready((updates, carry[0]))

    run.lower_s, run.compile_s = seconds
    return run


def _optax_step(donate: bool):
    def build(shapes, config):
        opt = optax_reference(config)

        def step(grads, state, params):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return _carry_step(step, donate, shapes, config, opt)

    return build


def roofline_pass(shapes, config):
    """A pass at the device's copy speed over as many bytes as a fused step
    moves: one donated buffer, each 32-bit word read and written once (+1).

    A single streaming array op is what every backend runs fastest; the step's
    own shape (five arrays per leaf, four outputs) is not, since XLA may split
    it into a kernel per output and read the gradients again for each.
    """
    parameters = sum(math.prod(s) for s in shapes.values())
    words = max(1, int(parameters * config.min_bytes_per_param("step") // 8))
    copy = jax.jit(lambda buffer: buffer + jnp.uint32(1), donate_argnums=0)
    carry = [jnp.zeros((words,), jnp.uint32)]

    def run():
        carry[0] = copy(carry[0])
        carry[0].block_until_ready()

    run.bytes_moved = 8 * words
    return run


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device() -> str:
    """Where torch's contender runs: the GPU when jax runs on one too, so
    both steps stream the same memory."""
    import torch

    return (
        "cuda"
        if jax.default_backend() == "gpu" and torch.cuda.is_available()
        else "cpu"
    )


def _torch_fused(shapes, config):
    import torch

    if config.optax_mu_dtype not in (None, config.dtype):
        raise ValueError("torch keeps mu in the parameter dtype")
    dtype = getattr(torch, config.dtype)
    device = torch_device()
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(
            (0.02 * torch.randn(s, generator=generator)).to(device=device, dtype=dtype)
        )
        for s in shapes.values()
    ]
    for p in params:
        p.grad = (0.01 * torch.randn(p.shape, generator=generator)).to(
            device=device, dtype=dtype
        )
    if not config.recipe:
        opt = torch.optim.Adam(params, lr=LEARNING_RATE, amsgrad=True, fused=True)
        step = opt.step
    else:
        # The recipe as torch writes it: a foreach clip, then fused AdamW (its
        # decoupled decay) over two groups, matrices decayed and vectors not.
        groups = [
            {
                "params": [p for p in params if p.ndim >= 2],
                "weight_decay": RECIPE["weight_decay"],
            },
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=LEARNING_RATE,
            amsgrad=True,
            fused=True,
        )

        def step():
            torch.nn.utils.clip_grad_norm_(
                params, RECIPE["max_grad_norm"], foreach=True
            )
            opt.step()

    if device == "cpu":
        return step

    def run():
        step()
        torch.cuda.synchronize()

    return run


def implementations_here(device=None) -> list[str]:
    """The implementations `bench` times on `device` (jax's first): the
    default there first, then the other where the kernel compiles (TPU,
    Hopper GPUs); on other backends the kernel would run interpreted."""
    device = device or jax.devices()[0]
    default = _implementations.implementation_for(device).name
    target = _implementations.Target.of(device)
    compiles = target.platform in common.COMPILED_PLATFORMS and (
        target.cannot_compile_kernel() is None
    )
    others = [n for n in _implementations.IMPLEMENTATIONS if n != default]
    return [default, *(others if compiles else [])]


def contenders(with_torch: bool) -> list[Contender]:
    """The roofline first, then this package (its default implementation,
    then, donated, any other that compiles here), optax and (optionally)
    torch."""
    ours, *others = implementations_here()
    chosen = [
        Contender(ROOFLINE, "step", roofline_pass),
        Contender(f"step [{ours}] donated", "step", _our_step(True)),
        *(
            Contender(f"step [{name}] donated", "step", _our_step(True, name))
            for name in others
        ),
        Contender(f"step [{ours}]", "step", _our_step(False)),
        Contender(f"update [{ours}] donated", "update", _our_update),
        Contender("optax+apply donated", "step", _optax_step(True)),
        Contender("optax+apply", "step", _optax_step(False)),
    ]
    if with_torch and torch_available():
        import torch

        device = torch_device()
        where = "cuda" if device == "cuda" else f"{torch.get_num_threads()} threads"
        chosen.append(Contender(f"torch fused ({where})", "step", _torch_fused))
    return chosen
