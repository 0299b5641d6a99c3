"""Which implementation runs on which device, with simulated devices.

Mosaic GPU compiles for Hopper (compute capability 9.0) and newer only, so
`"pallas"` on a GPU it cannot compile for raises at trace time.
`implementation=None` runs the kernel on TPU and the XLA path elsewhere: on
CPU the kernel would be interpreted, and on Hopper GPUs it was measured no
faster (`_implementations.KERNEL_BY_DEFAULT`). The devices are stand-ins with the attributes jax's
devices have, handed to the step through `_implementations.placed_device`.
"""

from __future__ import annotations

import dataclasses

import exporting
import jax
import jax.numpy as jnp
import pytest

import pallas_amsgrad
from pallas_amsgrad import _implementations


@dataclasses.dataclass(frozen=True)
class FakeClient:
    platform_version: str


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    platform: str
    device_kind: str
    client: FakeClient
    compute_capability: str | None = None


def cuda(capability: str, kind: str) -> FakeDevice:
    return FakeDevice("gpu", kind, FakeClient("cuda 13000"), capability)


H100 = cuda("9.0", "NVIDIA H100 80GB HBM3")
B200 = cuda("10.0", "NVIDIA B200")
A100 = cuda("8.0", "NVIDIA A100-SXM4-80GB")
L4 = cuda("8.9", "NVIDIA L4")
MI300 = FakeDevice("gpu", "AMD Instinct MI300X", FakeClient("rocm 6.4.1"), "gfx942")
TPU = FakeDevice("tpu", "TPU v5p", FakeClient("PJRT C API"))
CPU = FakeDevice("cpu", "cpu", FakeClient("cpu"))


@pytest.mark.parametrize(
    "device, expected",
    [
        (TPU, "pallas"),
        (H100, "xla"),
        (B200, "xla"),
        (A100, "xla"),
        (L4, "xla"),
        (MI300, "xla"),
        (CPU, "xla"),
        (FakeDevice("METAL", "Apple M3", FakeClient("metal")), "xla"),
    ],
    ids=lambda v: getattr(v, "device_kind", v),
)
def test_implementation_for_each_device(device, expected):
    assert pallas_amsgrad.implementation_for(device).name == expected


def test_the_real_cpu_device_gets_the_xla_path():
    [device] = jax.devices()[:1]
    assert pallas_amsgrad.implementation_for(device).name == "xla"


def test_block_sizes_go_to_the_kernel_where_it_is_chosen():
    sizes = pallas_amsgrad.BlockSizes(64)
    assert pallas_amsgrad.implementation_for(TPU, sizes).block_sizes == sizes


def _step_jaxpr(monkeypatch, device, implementation):
    """The step's jaxpr, traced as if placed on `device`."""
    monkeypatch.setattr(_implementations, "placed_device", lambda arrays: device)
    opt = pallas_amsgrad.amsgrad(1e-3, implementation=implementation)
    params = {"w": jnp.ones((8, 128)), "b": jnp.ones((7,), jnp.bfloat16)}
    return str(jax.make_jaxpr(opt.step)(params, opt.init(params), params))


@pytest.mark.parametrize(
    "device", [H100, B200, A100, L4, MI300, CPU], ids=lambda d: d.device_kind
)
def test_default_takes_the_xla_path_off_tpu(monkeypatch, device):
    assert "pallas_call" not in _step_jaxpr(monkeypatch, device, None)


def test_default_runs_the_kernel_on_tpu(monkeypatch):
    assert "pallas_call" in _step_jaxpr(monkeypatch, TPU, None)


def test_default_on_tpu_takes_8_bit_rows_the_gpu_kernel_refuses(monkeypatch):
    """8-bit state in rows too long for the GPU kernel to take whole: the
    default on a TPU runs the TPU kernel on them, lowered for TPU alone (the
    GPU kernel, which `Pallas()` also traces, refuses them)."""
    monkeypatch.setattr(_implementations, "placed_device", lambda arrays: TPU)
    params = {"w": jax.ShapeDtypeStruct((16, 50000), jnp.float32)}
    opt = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.int8)
    state = jax.eval_shape(opt.init, params)
    assert "pallas_call" in str(jax.make_jaxpr(opt.step)(params, state, params))


def test_pallas_on_hopper_exports_the_mosaic_gpu_kernel(monkeypatch):
    """`"pallas"` traced for an sm_90 device lowers, for `cuda`, to Mosaic
    GPU custom calls; the default there, and anything for an sm_80 device,
    to none."""
    params = {"w": jax.ShapeDtypeStruct((8, 128), jnp.float32)}
    modules = {}
    for device, implementation in [(H100, "pallas"), (H100, None), (A100, None)]:
        monkeypatch.setattr(_implementations, "placed_device", lambda a, d=device: d)
        opt = pallas_amsgrad.amsgrad(1e-3, implementation=implementation)
        state = jax.eval_shape(opt.init, params)
        exported = jax.export.export(jax.jit(opt.step), platforms=["cuda"])
        modules[device, implementation] = exported(params, state, params).mlir_module()
    assert "custom_call @mosaic_gpu" in modules[H100, "pallas"]
    assert "custom_call @mosaic_gpu" not in modules[H100, None]
    assert "custom_call @mosaic_gpu" not in modules[A100, None]


@pytest.mark.parametrize(
    "device, words",
    [
        (A100, ["NVIDIA A100-SXM4-80GB", "compute capability 8.0", "9.0"]),
        (L4, ["NVIDIA L4", "compute capability 8.9"]),
        (MI300, ["AMD Instinct MI300X", "rocm", "NVIDIA GPUs only"]),
    ],
    ids=lambda v: getattr(v, "device_kind", None),
)
def test_pallas_where_it_cannot_compile_raises_at_trace_time(
    monkeypatch, device, words
):
    with pytest.raises(ValueError, match="implementation='xla'") as error:
        _step_jaxpr(monkeypatch, device, "pallas")
    for word in words:
        assert word in str(error.value)


def test_interpreted_kernels_run_on_any_device(monkeypatch):
    """An `interpret_params` object never compiles for the device."""
    from jax.experimental.pallas import tpu as pltpu

    interpreted = pallas_amsgrad.Pallas(interpret_params=pltpu.InterpretParams())
    assert "pallas_call" in _step_jaxpr(monkeypatch, A100, interpreted)


def test_placed_device_is_that_of_a_concrete_input():
    x = jax.device_put(jnp.ones(3), jax.devices()[-1])
    assert _implementations.placed_device([x]) == jax.devices()[-1]


def test_placed_device_follows_jax_default_device():
    device = jax.devices()[-1]
    with jax.default_device(device):
        assert _implementations.placed_device([]) == device
    with jax.default_device("cpu"):
        assert _implementations.placed_device([]) == jax.devices("cpu")[0]
    assert _implementations.placed_device([]) == jax.devices()[0]


def _traced_step(implementation) -> str:
    params = {"w": jnp.ones((8, 130)), "b": jnp.ones(3)}
    opt = pallas_amsgrad.amsgrad(0.1, implementation=implementation)
    return str(jax.make_jaxpr(opt.step)(params, opt.init(params), params))


def test_kernel_for_named_platforms_traces_only_theirs():
    """`Pallas()` traces the TPU and GPU kernels and the interpreter, to be
    chosen at lowering; `Pallas(platforms=("cpu",))` the interpreter alone."""
    assert "platform_index" in _traced_step(pallas_amsgrad.Pallas())
    assert "platform_index" not in _traced_step(
        pallas_amsgrad.Pallas(platforms=("cpu",))
    )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernel_for_one_platform_exports_for_it(platform):
    params = jax.ShapeDtypeStruct((8, 256), jnp.float32)
    opt = pallas_amsgrad.amsgrad(
        0.1, implementation=pallas_amsgrad.Pallas(platforms=(platform,))
    )
    state = jax.eval_shape(opt.init, params)
    module = exporting.export(jax.jit(opt.step), platform, params, state, params)
    target = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu"}[platform]
    assert target in module


def test_kernel_for_other_platforms_is_refused_naming_them():
    opt = pallas_amsgrad.amsgrad(
        0.1, implementation=pallas_amsgrad.Pallas(platforms=("tpu",))
    )
    params = jnp.ones(4)
    with pytest.raises(ValueError, match=r"lowered only for platforms=\('tpu',\).*cpu"):
        opt.step(params, opt.init(params), params)


@pytest.mark.parametrize("platforms", ["tpu", (), ("TPU",), (1,)], ids=repr)
def test_platforms_must_be_a_tuple_of_platform_names(platforms):
    with pytest.raises(TypeError, match=r"platforms=.* must be None or a non-empty"):
        pallas_amsgrad.Pallas(platforms=platforms)
