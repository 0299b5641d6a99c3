"""pallas-amsgrad: a fused Pallas AMSGrad step, a drop-in for optax.amsgrad."""

from pallas_amsgrad._implementations import (
    IMPLEMENTATIONS,
    Pallas,
    Xla,
    implementation_for,
)
from pallas_amsgrad._quantization import QuantizedArray
from pallas_amsgrad._state import convert_state, dequantize
from pallas_amsgrad._transform import (
    GradientTransformationWithStep,
    amsgrad,
    scale_by_amsgrad,
)
from pallas_amsgrad.kernels.common import BlockSizes

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "GradientTransformationWithStep",
    "Pallas",
    "QuantizedArray",
    "Xla",
    "amsgrad",
    "convert_state",
    "dequantize",
    "implementation_for",
    "scale_by_amsgrad",
]
